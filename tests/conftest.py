"""Shared test setup. Tests take every default from the repository's params.yaml, the one place
a default is written (the schema in rnnlab/config.py has none): a test states only the settings
it is about, and `shipped_params` / `shipped` fill in the rest."""

import copy
import os
from pathlib import Path

import pytest

from rnnlab.cli.presets import merged
from rnnlab.config import Params, read_yaml

# Both tools phone home unless told not to.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """Kernel choices (rnnlab/kernels/choice.py) and compiled code (rnnlab/kernels/native.py) cached for this test
    session only, shared by its processes (stages that DVC starts inherit it): never the user's."""
    previous = os.environ.get("RNNLAB_CACHE_DIR")
    os.environ["RNNLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("rnnlab-cache"))
    yield Path(os.environ["RNNLAB_CACHE_DIR"])
    if previous is None:
        os.environ.pop("RNNLAB_CACHE_DIR", None)
    else:
        os.environ["RNNLAB_CACHE_DIR"] = previous

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
        "evaluate": {"prefixes": ["time"], "num_tokens": 5},
        "tracking": {"enabled": False},
    })
