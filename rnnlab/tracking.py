"""MLflow: one run per trained variant, reopened by its evaluation.

Where runs go comes from the environment: MLFLOW_TRACKING_URI, else a SQLite store `mlflow.db`
in the working directory (the repository root under DVC). A tracking server that does not answer
is reported before any training starts. A run that raises is ended FAILED; one stopped by Ctrl-C
or SIGTERM is ended KILLED; none is left RUNNING.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# Both tools phone home unless told not to; set before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes

import requests  # noqa: E402

from rnnlab.config import Tracking  # noqa: E402
from rnnlab.errors import UserError  # noqa: E402

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


class Tracker:
    """The active MLflow run, or nothing at all when tracking is off (every call a no-op)."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run_id:
            import mlflow

            # MLflow caps a param value at 6000 characters; ours are short settings.
            mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.run_id:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=folder)

    def log_dataset(self, ids, source: str, name: str, digest: str, context: str) -> None:
        if self.run_id:
            import mlflow

            dataset = mlflow.data.from_numpy(ids, source=source, name=name, digest=digest[:36])
            mlflow.log_input(dataset, context=context)


def check_reachable(uri: str) -> None:
    """Fail now, naming the URI, if the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as err:
            raise UserError(
                f"the MLflow tracking server at {uri} is unreachable ({type(err).__name__}); "
                "start it, point MLFLOW_TRACKING_URI elsewhere (unset: local mlflow.db), "
                "or set tracking.enabled: false in params.yaml"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
        if not os.access(folder, os.W_OK):
            raise UserError(f"the MLflow store {uri}: folder {folder} is not writable")


class Terminated(BaseException):
    """SIGTERM, raised so the run is closed as KILLED like Ctrl-C."""


@contextmanager
def tracked_run(cfg: Tracking, experiment: str, run_name: str, tags: dict[str, Any],
                run_id: str | None = None) -> Iterator[Tracker]:
    """An MLflow run for the block: a new one, or `run_id` reopened (evaluation, a resume)."""
    if not cfg.enabled:
        print("tracking: off (tracking.enabled: false in params.yaml); nothing goes to MLflow")
        yield Tracker(None)
        return
    uri = tracking_uri()
    check_reachable(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.experiment or experiment)
    if run_id and not _run_exists(run_id):
        run_id = None  # the store was reset or changed: start a new run
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags)
    print(f"tracking: MLflow run {run.info.run_id} ({'reopened' if run_id else 'new'}) in "
          f"experiment '{cfg.experiment or experiment}' at {uri}")
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    status = "FINISHED"
    try:
        yield Tracker(run.info.run_id)
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        mlflow.end_run(status)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
        return True
    except MlflowException:
        return False


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
    return tags


def folder_sha1(folder: str | Path) -> str:
    """Content hash of a folder's files (names and bytes), e.g. the tokenized data."""
    h = hashlib.sha1()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
