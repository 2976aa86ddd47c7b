"""Tiny copies of the project for end-to-end tests: a git + DVC repository of the project's files
with tiny params, and the commands run in it as a user would (the venv's tools first on PATH).

Running the pipeline costs most of the slow suite's time, so it runs once per test run:

    pipeline       `dvc repro` on a tiny copy, tracked to its own mlflow.db (conftest's fixture)
    experiments    a copy of that, then `dvc exp run -n exp-a -S train.lr=0.01` and `-n exp-b
                   -S train.lr=0.05` (EXPERIMENTS)

Both are built once even under pytest-xdist (the first worker builds under a file lock, the
others wait and read). Read them; a test that changes anything works on `.copy(dest)`, a
repository of its own (git, DVC's cache and the MLflow store with it) in milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import requests
from filelock import FileLock

from tools import tinyrepo

BIN = Path(sys.executable).parent
TINY_VARIANTS = {"rnn_scratch": {"cell": "rnn", "impl": "scratch"}, "lstm": {"cell": "lstm", "num_layers": 2}}


def user_env(cwd: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell in `cwd`: the venv's tools first on PATH, tracking to
    `cwd`/mlflow.db, no DVC experiment of the test process's own."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", **extra}
    env.pop("DVC_EXP_NAME", None)
    return env


def run(cmd, cwd, **kw):
    proc = subprocess.run(cmd, cwd=cwd, env=user_env(cwd), capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def dvc(*args: str, cwd: Path) -> str:
    """`dvc ARGS` in `cwd` as a user types it; its output (stdout and stderr)."""
    return run([str(BIN / "dvc"), *args], cwd)


def tiny_params(params: dict) -> dict:
    """params.yaml made tiny: 600 characters, 16 hidden units, 2 epochs, 1 thread, two variants."""
    return tinyrepo.shrink(params, max_tokens=600, variants=TINY_VARIANTS,
                           train=dict(epochs=2, hidden_size=16, num_steps=8, batch_size=4,
                                      threads=1),
                           evaluate=dict(num_tokens=10, num_samples=1))


def edit_params(repo: Path, edit: Callable[[dict], None], message: str | None = None) -> None:
    """Change repo's params.yaml with `edit(params)`; with `message`, commit it."""
    tinyrepo.edit_params(repo, edit)
    if message:
        git(repo, "commit", "-qam", message)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout


def copy_repo(dest: Path, edit=None) -> Path:
    """A git + DVC copy of the project's files (tracked and untracked-not-ignored), with tiny params
    (then `edit(params)`, if given)."""
    return tinyrepo.tiny_repo(dest, lambda p: (tiny_params(p), edit and edit(p)), commit="tiny")


def copy_tree(src: Path, dest: Path) -> Path:
    """A repository copied whole (git, DVC's cache, mlflow.db and mlruns/); the store's absolute
    paths (artifact locations) rewritten to the copy's, so its runs and artifacts are its own."""
    shutil.copytree(src, dest, symlinks=True)
    store = dest / "mlflow.db"
    if store.is_file():
        retarget_store(store, str(src), str(dest))
    return dest


def retarget_store(store: Path, old: str, new: str) -> None:
    """Every text value of the SQLite store that starts with (or names a file URI under) `old`
    now points under `new`: experiments' artifact locations, runs' artifact URIs, models'."""
    with sqlite3.connect(store) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                if kind.upper() in ("TEXT", "VARCHAR") or kind.upper().startswith("VARCHAR"):
                    db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                               f'WHERE instr("{column}", ?) > 0', (old, new, old))


def store_copy(empty: Path, folder: Path) -> str:
    """A fresh MLflow store at folder/mlflow.db, copied from `empty` (conftest's empty_store, made
    once: a new store's migrations take seconds), as MLflow would have made it there (its Default
    experiment keeps artifacts in folder/mlruns/0). Returns its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty, folder / "mlflow.db")
    retarget_store(folder / "mlflow.db", str(empty.parent), str(folder))
    return f"sqlite:///{folder}/mlflow.db"


@dataclass
class Built:
    """A repository built once for the whole test run, and what building it printed."""

    repo: Path
    output: dict[str, str]   # step name -> its output

    def copy(self, dest: Path) -> Path:
        return copy_tree(self.repo, dest)


def build_once(folder: Path, build: Callable[[Path], dict[str, str]]) -> Built:
    """`build(folder / "repo")` once for every process of this test run (pytest-xdist workers
    share `folder`): the first builds under a lock, the others read what it left."""
    folder.mkdir(parents=True, exist_ok=True)
    done, failed = folder / "built.json", folder / "failed.txt"
    with FileLock(str(folder / "build.lock")):
        if failed.exists():  # one failed build is reported by every test that needed it
            raise AssertionError(f"building {folder.name} failed (first attempt):\n{failed.read_text()}")
        if not done.exists():
            try:
                output = build(folder / "repo")
            except BaseException as err:
                failed.write_text(str(err))
                raise
            done.write_text(json.dumps(output))
    return Built(folder / "repo", json.loads(done.read_text()))


def build_pipeline(repo: Path) -> dict[str, str]:
    copy_repo(repo)
    return {"repro": dvc("repro", cwd=repo)}


def build_experiments(pipeline: Built) -> Callable[[Path], dict[str, str]]:
    def build(repo: Path) -> dict[str, str]:
        pipeline.copy(repo)
        return {name: dvc("exp", "run", "-n", name, "-S", setting, cwd=repo)
                for name, setting in EXPERIMENTS.items()}
    return build


# The session's experiments, one after the other; the workspace ends as exp-b.
EXPERIMENTS = {"exp-a": "train.lr=0.01", "exp-b": "train.lr=0.05"}


class MlflowServer:
    """A running `mlflow server` (tests/repos.py: mlflow_server): its URL, and `stop()`."""

    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def stop(self) -> None:
        """The server and its worker (its whole process group) stopped, if still running."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@contextmanager
def mlflow_server(store: str, folder: Path, *args: str) -> Iterator[MlflowServer]:
    """`mlflow server --backend-store-uri STORE ARGS` on a free port of 127.0.0.1, from `folder`
    (its log: folder/server.log), once /health answers; stopped at the end whatever happens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", store, *args],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = MlflowServer(proc, f"http://127.0.0.1:{port}")
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if requests.get(f"{server.url}/health", timeout=2).ok:
                        break
                except requests.RequestException:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"mlflow server did not start:\n{(folder / 'server.log').read_text()}")
                time.sleep(0.5)
            yield server
        finally:
            server.stop()
