"""Where runs go, and whether they can: the tracking URI (MLFLOW_TRACKING_URI, else the local
SQLite store), a SQLite store's lock for parallel stages, and the
checks that a server answers and accepts the login (docs/tracking.md, docs/team.md).
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
from filelock import FileLock, Timeout

from rnnlab.errors import UserError
from rnnlab.fileio import repo_root
from rnnlab.redact import public_uri

STORE_FILE = "mlflow.db"   # the local default store, at the repository root
ARTIFACTS_DIR = "mlruns"   # a SQLite store's artifacts, beside it
LOCK_SECONDS = 300         # wait this long for another stage's turn at a SQLite store


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else `sqlite:///<repository root>/mlflow.db` (absolute).

    A login written into the URI (`http://user:pw@host`) moves to MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD, and the URI loses it: MLflow prints its URI ("View run at ...")."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / STORE_FILE}"
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.username is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username))
        if parts.password is not None:
            os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
        uri = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store, in
    `mlruns/<experiment>/<run id>/` (MLflow's own default is `./mlruns` of whatever the working
    directory is: a temp copy under `dvc exp run --temp`); for a server, wherever the server
    says (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    root = Path(uri.removeprefix("sqlite:///")).resolve().parent / ARTIFACTS_DIR
    return str(root / experiment if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", experiment) else root)


def store_lock(uri: str) -> AbstractContextManager:
    """Turns at a SQLite store for parallel stages: a file lock beside it (`<store>.lock`),
    held while the store is created and during each write. SQLite takes one writer at a time,
    and MLflow creates the schema of a new store with no lock of its own, so two stages starting
    together on a new store raced ("table ... already exists"). A server needs no lock."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    return _StoreLock(Path(uri.removeprefix("sqlite:///") + ".lock"))


class _StoreLock:
    """A reusable, reentrant file lock; waiting too long is a UserError naming the file."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = FileLock(path, timeout=LOCK_SECONDS, thread_local=False)

    def __enter__(self) -> None:
        try:
            self._lock.acquire()
        except Timeout:
            raise UserError(f"waited {LOCK_SECONDS} s for the MLflow store lock {self.path}, held "
                            "by another stage; if no other stage runs, delete the file") from None

    def __exit__(self, *exc) -> None:
        self._lock.release()


def check_reachable(uri: str) -> None:
    """Fail now, naming the URI, if the tracking store cannot be reached or refuses the login."""
    if uri.startswith(("http://", "https://")):
        if not server_answers(uri):
            raise UserError(
                f"the MLflow tracking server at {public_uri(uri)} is unreachable; start it, point "
                "MLFLOW_TRACKING_URI elsewhere (unset: the local mlflow.db), or set "
                "tracking.enabled: false in params.yaml"
            )
        check_login(uri)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
        if not os.access(folder, os.W_OK):
            raise UserError(f"the MLflow store {public_uri(uri)}: folder {folder} is not writable")


def check_login(uri: str) -> None:
    """A server with authentication (`mlflow server --app-name basic-auth`) must accept the login
    of MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as err:
        if is_refusal(err):
            raise refusal_error(err, uri, "to read its experiments") from None
        raise


def is_refusal(err: BaseException) -> bool:
    """The server refused the login (401) or the action (403)."""
    return getattr(err, "error_code", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED")


def refusal_error(err: BaseException, uri: str, action: str, experiment: str | None = None) -> UserError:
    """One line for a refusal: who was refused what, by which server, and what to set."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    where = public_uri(uri)
    if getattr(err, "error_code", None) == "UNAUTHENTICATED":
        who = (f"the password of user {user!r}" if user and os.environ.get("MLFLOW_TRACKING_PASSWORD")
               else "a request without credentials")
        return UserError(f"the MLflow server at {where} refused {who} (401 Unauthorized); set "
                         "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your login "
                         "(the local team stack prints them: make team-env)")
    whom = f"user {user!r}" if user else "this login"
    fix = (f"ask the owner of experiment {experiment!r} or an admin for EDIT on it (python -m "
           f"deploy.stack grant {user or '<user>'} {experiment} EDIT), or set tracking.experiment "
           "in params.yaml to an experiment of your own") if experiment else \
        "ask an admin of the server for the permission"
    return UserError(f"the MLflow server at {where} refused {whom} permission {action} "
                     f"(403 Forbidden); {fix}")


def first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def server_answers(uri: str) -> bool:
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        return True
    except requests.RequestException:
        return False

def server_gone(err: BaseException, uri: str | None) -> bool:
    """`err` came from a tracking server that no longer answers /health (a connection failure, a
    5xx while it restarts). A refusal or a bad value is a real error, whatever the server does."""
    return (uri is not None and uri.startswith(("http://", "https://")) and is_tracking_error(err)
            and not is_refusal(err) and not server_answers(uri))


def is_tracking_error(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(err, (MlflowException, requests.RequestException))
