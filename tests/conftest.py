"""Shared test setup. Tests take every default from the repository's params.yaml, the one place
a default is written (the schema in rnnlab/config.py has none): a test states only the settings
it is about, and `shipped_params` / `shipped` fill in the rest.

Before any test module is imported, the kernel choices (rnnlab/kernels/choice.py) and compiled
code (rnnlab/kernels/native.py) get a cache of this test run's own (RNNLAB_CACHE_DIR), shared by
its processes and by the stages they start: never the user's ~/.cache/rnnlab, whose contents
would make results depend on what the machine measured before.

RNNLAB_NO_SKIPS=1 (.ci/run sets it) makes every skip a failure that gives the skip's reason: in
CI nothing is skipped (no compiler, no PostgreSQL, no browser is a failure there).
"""

import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from rnnlab.cli.presets import merged
from rnnlab.config import Params, read_yaml

# Both tools phone home unless told not to.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

_OWN_CACHE: list[str] = []  # the cache folder this run made (removed at the end), if any


def pytest_configure(config):
    """The test run's own kernel cache, before collection imports any test module (some copy
    os.environ for their subprocesses). A worker of pytest-xdist inherits its controller's."""
    if os.environ.get("RNNLAB_TEST_CACHE_DIR"):  # set by the controller: a worker shares it
        os.environ["RNNLAB_CACHE_DIR"] = os.environ["RNNLAB_TEST_CACHE_DIR"]
        return
    folder = tempfile.mkdtemp(prefix="rnnlab-test-cache-")
    _OWN_CACHE.append(folder)
    os.environ["RNNLAB_CACHE_DIR"] = os.environ["RNNLAB_TEST_CACHE_DIR"] = folder


def pytest_unconfigure(config):
    for folder in _OWN_CACHE:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("RNNLAB_NO_SKIPS") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, and RNNLAB_NO_SKIPS forbids it: {reason}"


@pytest.fixture(scope="session")
def kernel_cache() -> Path:
    """This test run's kernel and compiled-code cache (RNNLAB_CACHE_DIR)."""
    return Path(os.environ["RNNLAB_CACHE_DIR"])


SHIPPED = read_yaml(Path(__file__).resolve().parents[1] / "params.yaml")


def shipped_params(overlay: dict | None = None) -> dict:
    """params.yaml as a fresh mapping, with `overlay` on top as a preset is: nested keys merged,
    `variants` replaced."""
    return merged(copy.deepcopy(SHIPPED), copy.deepcopy(overlay or {}))


def shipped(section: type, **values):
    """A section of params.yaml as its schema object, e.g. shipped(Train, lr=0.01)."""
    name = next(n for n, f in Params.model_fields.items() if f.annotation is section)
    return section(**{**copy.deepcopy(SHIPPED[name]), **values})


@pytest.fixture
def params_dict():
    """A small valid params mapping (a fresh copy per test)."""
    return shipped_params({
        "data": {"corpus": "timemachine"},
        "tokenize": {"token": "char"},
        "train": {"lr": 0.01, "clip_theta": 1.0, "num_steps": 8, "hidden_size": 16, "batch_size": 4,
                  "epochs": 2, "optimizer": "adam", "device": "cpu", "threads": 1},
        "variants": {"rnn": {"cell": "rnn"}, "lstm_scratch": {"cell": "lstm", "impl": "scratch"}},
        "evaluate": {"prefixes": ["time"], "num_tokens": 5, "num_samples": 1},
        "tracking": {"enabled": False},
    })
