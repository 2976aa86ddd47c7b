"""A throwaway clone of this repository with small params, for the benchmarks that run `dvc`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tools.tinyrepo import shrink, tiny_repo

VARIANTS = {"rnn": {"cell": "rnn"}}  # one variant: train@rnn, evaluate@rnn


def tiny_clone(work: Path, max_tokens: int | None = 600, **train) -> tuple[Path, dict, str]:
    """A git clone of HEAD at work/repo whose params.yaml trains one `rnn` variant with
    `train` (over epochs 1, hidden 8, 8 steps, batch 4, 1 thread), on the first `max_tokens`
    tokens, without tracking and with a short evaluation. -> the clone, the environment to run
    dvc in (this venv's bin first, outside any experiment), the dvc executable."""
    settings = {"epochs": 1, "hidden_size": 8, "num_steps": 8, "batch_size": 4, "threads": 1,
                **train}
    repo = tiny_repo(work / "repo", head=True, edit=lambda params: shrink(
        params, max_tokens=max_tokens, train=settings, variants=VARIANTS,
        evaluate=dict(num_tokens=5, num_samples=0), tracking=False))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_EXP_NAME", None)
    return repo, env, str(bin_dir / "dvc")
