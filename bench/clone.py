"""A throwaway clone of this repository with small params, for the benchmarks that run `dvc`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_clone(work: Path, max_tokens: int | None = 600, **train) -> tuple[Path, dict, str]:
    """A git clone of HEAD at work/repo whose params.yaml trains one `rnn` variant with
    `train` (over epochs 1, hidden 8, 8 steps, batch 4, 1 thread), on the first `max_tokens`
    tokens, without tracking and with a short evaluation. -> the clone, the environment to run
    dvc in (this venv's bin first, outside any experiment), the dvc executable."""
    repo = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["max_tokens"] = max_tokens
    params["train"].update({"epochs": 1, "hidden_size": 8, "num_steps": 8, "batch_size": 4,
                            "threads": 1, **train})
    params["variants"] = {"rnn": {"cell": "rnn"}}
    params["evaluate"].update(num_tokens=5, num_samples=0)
    params["tracking"]["enabled"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_EXP_NAME", None)
    return repo, env, str(bin_dir / "dvc")
