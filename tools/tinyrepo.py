"""Copies of this repository to run the pipeline or the tests in, with params.yaml made tiny: the
one builder that tests/repos.py, bench/ and tools/mutations.py share, each with its own settings.

    tree_copy(dest)                  the working tree's files (tracked, untracked but not ignored)
    tiny_repo(dest, edit, head=...)  that copy, or a git clone of HEAD, its params.yaml edited
    shrink(params, max_tokens=..., train=..., variants=..., evaluate=...)   a tiny params dict
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
GIT_USER = ("-c", "user.name=t", "-c", "user.email=t@t")  # a commit needs a name, not a person


def tree_copy(dest: Path, root: Path = ROOT) -> Path:
    """The files git tracks or would track in `root` (`git ls-files -co --exclude-standard`), as
    they are in its working tree, copied under `dest`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (root / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, dest / f)
    return dest


def edit_params(repo: Path, edit: Callable[[dict], object]) -> None:
    """repo's params.yaml changed by `edit(params)` (in place on the parsed dict)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


def tiny_repo(dest: Path, edit: Callable[[dict], object] | None = None, *, head: bool = False,
              commit: str | None = None) -> Path:
    """A copy of this repository at `dest`: a git clone of HEAD (`head`: the committed code only)
    or else `tree_copy`; its params.yaml changed by `edit` if given; with `commit`, every file
    committed with that message (the tree's copy `git init`-ed first)."""
    if head:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    else:
        dest.mkdir(parents=True, exist_ok=True)
        tree_copy(dest)
    if edit is not None:
        edit_params(dest, edit)
    if commit is not None:
        if not head:
            subprocess.run(["git", "init", "-q"], cwd=dest, check=True, capture_output=True)
        for args in (("add", "-A"), ("commit", "-qm", commit)):
            subprocess.run(["git", *GIT_USER, *args], cwd=dest, check=True, capture_output=True)
    return dest


def shrink(params: dict, *, max_tokens: int | None, train: dict, variants: dict, evaluate: dict,
           tracking: bool | None = None) -> dict:
    """params.yaml's dict made tiny, in place: data.max_tokens set, `train` and `evaluate` merged
    into their sections, the variants replaced by a copy of `variants`, tracking.enabled set
    unless None. Returns `params`."""
    params["data"]["max_tokens"] = max_tokens
    params["train"].update(train)
    params["variants"] = copy.deepcopy(variants)
    params["evaluate"].update(evaluate)
    if tracking is not None:
        params["tracking"]["enabled"] = tracking
    return params
