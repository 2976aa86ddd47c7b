import os

import pytest

# Both tools phone home unless told not to.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def params_dict():
    """A small valid params mapping (a fresh copy per test)."""
    return {
        "data": {"corpus": "timemachine"},
        "tokenize": {"token": "char"},
        "train": {"lr": 0.01, "clip_theta": 1.0, "num_steps": 8, "hidden_size": 16, "batch_size": 4,
                  "epochs": 2, "optimizer": "adam", "device": "cpu", "threads": 1},
        "variants": {"rnn": {"cell": "rnn"}, "lstm_scratch": {"cell": "lstm", "impl": "scratch"}},
        "evaluate": {"prefixes": ["time"], "num_tokens": 5},
        "tracking": {"enabled": False},
    }
