"""The tags that link an MLflow run to what made it: the git commit, the DVC stage and
experiment, the pipeline (code + params.yaml), and content hashes of data folders."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


def git_tags() -> dict[str, str]:
    """The commit the code came from and whether the work tree had changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"rnnlab.git_commit": "unknown"}
    return {"mlflow.source.git.commit": commit, "rnnlab.git_commit": commit,
            "rnnlab.git_dirty": str(bool(dirty)).lower()}


def dvc_tags(stage: str, params_path: str | Path) -> dict[str, str]:
    """Links to DVC: the stage, the experiment (under `dvc exp run`), and a pipeline id shared by
    every run made from the same code and params.yaml (filter on it to see one repro's runs)."""
    params_sha = hashlib.sha1(Path(params_path).read_bytes()).hexdigest()
    commit = git_tags().get("rnnlab.git_commit", "")
    tags = {
        "rnnlab.dvc_stage": stage,
        "rnnlab.params_sha1": params_sha,
        "rnnlab.pipeline": hashlib.sha1(f"{commit}:{params_sha}".encode()).hexdigest()[:12],
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["rnnlab.dvc_exp"] = os.environ["DVC_EXP_NAME"]
    for name in ("sweep", "attempt", "worker"):  # set by a cluster sweep's worker (rnnlab/cluster)
        if os.environ.get(f"RNNLAB_{name.upper()}"):
            tags[f"rnnlab.{name}"] = os.environ[f"RNNLAB_{name.upper()}"]
    return tags


def folder_sha1(folder: str | Path) -> str:
    """Content hash of a folder's files (names and bytes), e.g. the tokenized data."""
    h = hashlib.sha1()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
