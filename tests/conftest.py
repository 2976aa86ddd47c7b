"""Shared test setup. Tests take every default from the repository's params.yaml, the one place
a default is written (the schema in rnnlab/config.py has none): a test states only the settings
it is about, and `shipped_params` / `shipped` fill in the rest.

Before any test module is imported, the kernel choices (rnnlab/kernels/choice.py) and compiled
code (rnnlab/kernels/native.py) get a cache of this test run's own (RNNLAB_CACHE_DIR), shared by
its processes and by the stages they start: never the user's ~/.cache/rnnlab, whose choices
would make results depend on what the machine measured before (its compiled library, keyed by
everything that makes it, is copied in).

RNNLAB_NO_SKIPS=1 (.ci/run sets it) makes every skip a failure that gives the skip's reason: in
CI nothing is skipped (no compiler, no PostgreSQL, no browser is a failure there).
"""

import copy
import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

from rnnlab.cli.presets import merged
from rnnlab.config import Params, read_yaml
from rnnlab.fileio import cache_dir as kernel_cache_dir
from tests.repos import Built, build_experiments, build_once, build_pipeline, store_copy

# Both tools phone home unless told not to.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

_OWN_CACHE: list[str] = []  # the cache folder this run made (removed at the end), if any


def pytest_configure(config):
    """The test run's own kernel cache, before collection imports any test module (some copy
    os.environ for their subprocesses). A worker of pytest-xdist inherits its controller's."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the cores shared among the workers, as
        import torch  # train.threads: auto shares them among stages

        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))
    if os.environ.get("RNNLAB_TEST_CACHE_DIR"):  # set by the controller: a worker shares it
        os.environ["RNNLAB_CACHE_DIR"] = os.environ["RNNLAB_TEST_CACHE_DIR"]
        return
    user_cache = kernel_cache_dir()  # before the variable points at the test run's own
    folder = tempfile.mkdtemp(prefix="rnnlab-test-cache-")
    _OWN_CACHE.append(folder)
    # The compiled time loop is a pure function of its file name (a digest of source, torch,
    # compiler, flags and CPU: rnnlab/kernels/native.py), so the one `make setup` built is the
    # one a build would make: the run takes it instead of compiling for half a minute. Kernel
    # choices (kernels.json) stay the run's own.
    for built in (user_cache / "native").glob("recurrence-*.so"):
        (Path(folder) / "native").mkdir(exist_ok=True)
        shutil.copy2(built, Path(folder) / "native" / built.name)
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


@pytest.fixture(autouse=True)
def reference_kernels(request, monkeypatch):
    """In this process, what runs is the reference path and MKL's products, as if forced
    (RNNLAB_KERNEL=reference, RNNLAB_PRODUCT=mkl, RNNLAB_PRECISION=float32), unless the environment forces something or the
    test is marked `measured`: a test's result must not depend on which code measured fastest on
    this machine (and measuring every tiny shape of the suite cost a third of its fast tests). The
    other paths have tests of their own that name them; stages run as subprocesses measure, as a
    user's do."""
    if request.node.get_closest_marker("measured"):
        return
    from rnnlab.kernels import choice

    real = choice.forced
    default = {"layer": "reference", "product": "mkl", "precision": "float32"}

    def forced(kind: str, key: str, allowed: list[str]) -> str | None:
        chosen = real(kind, key, allowed)
        return chosen if chosen is not None else (default[kind] if default[kind] in allowed else allowed[0])

    monkeypatch.setattr(choice, "forced", forced)


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory) -> Path:
    """A folder every process of this test run shares (the workers of pytest-xdist too)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def pipeline(shared_tmp) -> Built:
    """The project's pipeline run once: `dvc repro` on a tiny copy (tests/repos.py). Read only."""
    return build_once(shared_tmp / "pipeline", build_pipeline)


@pytest.fixture(scope="session")
def experiments(shared_tmp, pipeline) -> Built:
    """A copy of `pipeline` with two DVC experiments run in it: exp-a (train.lr=0.01), then
    exp-b (train.lr=0.05), which the workspace holds (tests/repos.py: EXPERIMENTS). Read only."""
    return build_once(shared_tmp / "experiments", build_experiments(pipeline))


@pytest.fixture(scope="session")
def empty_store(shared_tmp) -> Path:
    """An MLflow SQLite store with its tables made (seconds of migrations, paid once), to copy."""
    folder = shared_tmp / "empty-store"
    folder.mkdir(exist_ok=True)
    with FileLock(str(folder / "lock")):
        if not (folder / "mlflow.db").exists():
            from mlflow import MlflowClient

            MlflowClient(f"sqlite:///{folder / 'tmp.db'}").search_experiments()
            (folder / "tmp.db").rename(folder / "mlflow.db")
    return folder / "mlflow.db"


@pytest.fixture
def new_store(empty_store):
    """new_store(folder) -> the URI of a fresh MLflow store at folder/mlflow.db (tests/repos.py)."""
    return functools.partial(store_copy, empty_store)


@pytest.fixture(scope="module")
def environment_restored():
    """os.environ as it was before the module's first test, put back after its last: for a
    module whose tests log in to a server through the environment, as MLflow's client reads it
    (`pytestmark = pytest.mark.usefixtures("environment_restored")`)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_tokens(shared_tmp) -> Path:
    """data/tokens of the first 40,000 characters of The Time Machine (4,000 training tokens),
    tokenized as tests/stagerun.py's TINY params say. Read only."""
    from rnnlab.config import validate_params
    from rnnlab.corpora import BUILTIN
    from rnnlab.data.corpus import save_tokens, tokenize_corpus
    from tests.stagerun import TINY

    folder = shared_tmp / "tiny-tokens"
    with FileLock(str(shared_tmp / "tiny-tokens.lock")):
        if not (folder / "vocab.json").exists():
            params = validate_params(TINY)
            raw = BUILTIN["timemachine"].bundled_path().read_text(encoding="utf-8")[:40_000]
            save_tokens(tokenize_corpus(raw, params.data, params.tokenize), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_trained(shared_tmp, tiny_tokens) -> Path:
    """A folder with TINY's params.yaml and models/rnn and models/lstm trained on tiny_tokens by
    the train stage (tracking off). Read only."""
    from tests.stagerun import TINY, in_process, train_args, write_params

    folder = shared_tmp / "tiny-trained"
    with FileLock(str(shared_tmp / "tiny-trained.lock")):
        if not (folder / "models" / "lstm" / "best.pt").exists():
            folder.mkdir(exist_ok=True)
            write_params(folder, TINY)
            for variant in ("rnn", "lstm"):
                in_process("train", *train_args(folder, tiny_tokens, variant), cwd=folder, check=True)
    return folder


@pytest.fixture(scope="session")
def team():
    """The team stack (deploy/throwaway.py: PostgreSQL, moto's S3, MLflow with basic-auth),
    started once for the whole test run in a folder of its own (PostgreSQL's user must reach it:
    not under pytest's temporary root, whose mode every new pytest run resets). Every test that
    uses it runs on one pytest-xdist worker (`pytest_collection_modifyitems`)."""
    from deploy.postgres import pg_bin
    from rnnlab.errors import UserError
    from deploy.throwaway import team_stack

    try:
        pg_bin()
    except UserError as err:
        pytest.skip(f"the team stack needs PostgreSQL's server programs: {err}")
    folder = Path(tempfile.mkdtemp(prefix="rnnlab-team-"))
    try:
        with team_stack(folder / "team") as stack:
            yield stack
    finally:
        shutil.rmtree(folder, ignore_errors=True)


SERVER_FIXTURES = {"team": "team-stack"}  # fixture -> the xdist group of the tests that use it


def pytest_collection_modifyitems(config, items):
    """pytest-xdist's groups (--dist loadgroup): the tests that share a server run on one worker;
    the others by file, so that a worker imports what a file needs (MLflow: seconds) once.

    The group goes into the test's id (`path::test@group`, what the scheduler groups by) here:
    xdist 3.8 writes it to `item._nodeid`, which pytest 9 no longer reads (its ids live in
    `item._id`), so its own marker handling groups nothing and each worker started its own team
    stack."""
    from _pytest.nodeid import coerce_node_id

    for item in items:
        group = next((g for f, g in SERVER_FIXTURES.items() if f in getattr(item, "fixturenames", ())),
                     item.nodeid.split("::")[0])
        item.add_marker(pytest.mark.xdist_group(group))
        if getattr(config.option, "loadgroup", False) and "@" not in item.nodeid:  # an xdist worker
            item._id = coerce_node_id(f"{item.nodeid}@{group}")


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
