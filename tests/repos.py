"""Tiny copies of the project for end-to-end tests: a git + DVC repository of the project's files
with tiny params, and the commands run in it as a user would (the venv's tools first on PATH)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(cmd, cwd, **kw):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    env.pop("DVC_EXP_NAME", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def copy_repo(dest: Path, edit=None) -> Path:
    """A git + DVC copy of the project's files (tracked and untracked-not-ignored), with tiny params
    (then `edit(params)`, if given)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["data"]["max_tokens"] = 600
    params["train"].update(epochs=2, hidden_size=16, num_steps=8, batch_size=4, threads=1)
    params["variants"] = {"rnn_scratch": {"cell": "rnn", "impl": "scratch"},
                          "lstm": {"cell": "lstm", "num_layers": 2}}
    params["evaluate"].update(num_tokens=10, num_samples=1)
    if edit:
        edit(params)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest
