"""MLflow: each stage execution records its numbers in a run of the experiment that executed it.

Which run (docs/tracking.md, "Runs and DVC experiments"): `train@<v>` starts a new run, or
continues its own resumed one; `evaluate@<v>` adds to the training run when that run was made by
the same DVC experiment and has no evaluation yet, and otherwise (a training restored from DVC's
cache, or evaluated before) gets a run of its own, linked by the tag `rnnlab.train_run_id`. No
stage ever writes into a run of another experiment (`rnnlab.dvc_exp`).

Where runs go comes from the environment: MLFLOW_TRACKING_URI, else a SQLite store `mlflow.db`
at the repository root: DVC_ROOT, which DVC sets for every stage and points at the parent
repository under `dvc exp run --temp` and queued experiments, else the working directory. A SQLite
store keeps its artifacts beside it, in `mlruns/`. Parallel stages (`dvc queue start -j N`) take
turns at a SQLite store under a file lock beside it (`mlflow.db.lock`): its creation and every
write, so there is no schema race and no "database is locked". A tracking server that does not
answer, or that refuses the login (MLFLOW_TRACKING_USERNAME / _PASSWORD), is reported before any
training starts. A run that raises is ended FAILED; one stopped by Ctrl-C or SIGTERM is ended
KILLED; none is left RUNNING.

A server that stops answering during a run (restarted, say) loses nothing: the run's writes wait
in order and are sent when it answers again, for up to `tracking.patience` seconds at the end of
the stage; after that the stage fails with one error, and its resumable state lets `dvc repro`
send what the run lacks (docs/team.md, "Faults").
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

# Both tools phone home unless told not to; set before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")     # a hung server, not 120 s a call
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for kilobytes

import requests  # noqa: E402
from filelock import FileLock, Timeout  # noqa: E402

from rnnlab.config import Tracking  # noqa: E402
from rnnlab.errors import UserError  # noqa: E402
from rnnlab.fileio import repo_root  # noqa: E402

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


def public_uri(uri: str) -> str:
    """The URI as it may be shown: a password in it (`http://user:pw@host`) is never printed."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store, in
    `mlruns/<experiment>/<run id>/` (MLflow's own default is `./mlruns` of whatever the working
    directory is: a temp copy under `dvc exp run --temp`); for a server, wherever the server
    says (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    root = Path(uri.removeprefix("sqlite:///")).resolve().parent / ARTIFACTS_DIR
    return str(root / experiment if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", experiment) else root)


class Tracker:
    """The active MLflow run, or nothing at all when tracking is off (every call a no-op).

    `reopened`: the run existed before this stage (a resumed training, or the evaluation of this
    experiment's own training), so it already holds the params. Every write to a SQLite store is
    made under its lock (see `store_lock`).

    Writes are sent in order. One that fails because the tracking server does not answer waits,
    with every later one, until it answers again (`flush`); the training goes on meanwhile."""

    def __init__(self, run_id: str | None = None, reopened: bool = False,
                 lock: AbstractContextManager | None = None, uri: str | None = None):
        self.run_id = run_id
        self.reopened = reopened
        self._lock = lock or nullcontext()
        self._uri = uri
        self._pending: deque[list] = deque()   # [what, send], oldest first
        self._outage_reported = False

    @property
    def pending(self) -> list[str]:
        """What has not reached the server yet, oldest first."""
        return [what for what, _ in self._pending]

    def _write(self, what: str, send: Callable[[], None],
               keep: Callable[[], Callable[[], None]] | None = None) -> None:
        """Send now, or queue. `keep` makes a send that no longer needs what may change before a
        queued write goes (an artifact's file), for a write that has to wait."""
        entry = [what, send]
        self._pending.append(entry)
        if not self.flush() and keep is not None and any(e is entry for e in self._pending):
            entry[1] = keep()

    def flush(self) -> bool:
        """Send the waiting writes in order; False if the server still does not answer."""
        if self._pending and self._outage_reported and not _server_answers(self._uri or ""):
            return False  # still away: ask /health (fast), not the client (it retries for seconds)
        while self._pending:
            what, send = self._pending[0]
            try:
                with self._lock:
                    send()
            except Exception as err:
                if not _server_gone(err, self._uri):
                    raise
                if not self._outage_reported:
                    print(f"tracking: the MLflow server at {public_uri(self._uri or '')} does not "
                          f"answer ({_first_line(err)}); the run's writes wait until it is back",
                          file=sys.stderr, flush=True)
                    self._outage_reported = True
                return False
            self._pending.popleft()
        if self._outage_reported:
            print("tracking: the MLflow server answers again; every write waiting was sent",
                  file=sys.stderr, flush=True)
            self._outage_reported = False
        return True

    def flush_patiently(self, seconds: float) -> bool:
        """Flush, retrying for up to `seconds` while the server does not answer."""
        deadline = time.monotonic() + seconds
        while not self.flush():
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        return True

    def _log_batch(self, **batch) -> None:
        """One request (`log-batch`): the fluent mlflow.log_* ask for the run first, two."""
        from mlflow import MlflowClient

        MlflowClient().log_batch(self.run_id, **batch)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run_id:
            from mlflow.entities import Param

            # MLflow caps a param value at 6000 characters; ours are short settings.
            batch = [Param(k, "null" if v is None else str(v)) for k, v in params.items()]
            self._write("params", lambda: self._log_batch(params=batch))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            from mlflow.entities import Metric

            when = int(time.time() * 1000)  # when measured, however late it is sent
            batch = [Metric(k, float(v), when, step or 0) for k, v in metrics.items()]
            what = f"metrics of step {step}" if step is not None else "metrics"
            self._write(what, lambda: self._log_batch(metrics=batch))

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric `key` is already in the run (none when tracking is off)."""
        if not self.run_id:
            return set()
        from mlflow import MlflowClient

        return {m.step for m in MlflowClient().get_metric_history(self.run_id, key)}

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.run_id:
            from mlflow.entities import RunTag

            batch = [RunTag(k, str(v)) for k, v in tags.items()]
            self._write("tags", lambda: self._log_batch(tags=batch))

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.run_id:
            import mlflow

            path = Path(path)
            self._write(f"artifact {folder + '/' if folder else ''}{path.name}",
                        *_from_file(path, lambda file: mlflow.log_artifact(
                            str(file), artifact_path=folder, run_id=self.run_id)))

    def log_model(self, checkpoint: str | Path, example: str) -> None:
        """The checkpoint as the run's MLflow Model `model` (rnnlab/mlflow_model.py)."""
        if self.run_id:
            from rnnlab.mlflow_model import NAME, log_model

            def send(file: Path) -> None:
                seconds = log_model(file, example)
                print(f"tracking: logged the MLflow Model runs:/{self.run_id}/{NAME} "
                      f"({seconds:.1f} s)", flush=True)

            self._write(f"model {NAME}", *_from_file(Path(checkpoint), send))

    def register(self, name: str, train_run: str, val_ppl: float, data_sha1: str) -> None:
        """Register the model of `train_run` in the Model Registry if it beats the champion."""
        if self.run_id:
            from rnnlab.mlflow_model import register_if_better

            self._write(f"registration in {name}", lambda: print(
                register_if_better(name, train_run, val_ppl, data_sha1), flush=True))

    def log_dataset(self, ids, source: str, name: str, digest: str, context: str) -> None:
        if self.run_id:
            import mlflow

            from mlflow.data.sources import LocalArtifactDatasetSource

            # An explicit source: a bare path string matches two registered source classes and
            # MLflow warns "The specified dataset source can be interpreted in multiple ways".
            src = LocalArtifactDatasetSource(str(Path(source).resolve()))
            # MLflow caps a dataset digest at 36 characters.
            dataset = mlflow.data.from_numpy(ids, source=src, name=name, digest=digest[:36])
            self._write("dataset", lambda: mlflow.log_input(dataset, context=context))


def _from_file(path: Path, upload: Callable[[Path], None]
               ) -> tuple[Callable[[], None], Callable[[], Callable[[], None]]]:
    """(send `path` now, `keep`) for `Tracker._write`: a write that has to wait keeps the file's
    bytes as they are now, since the path may be rewritten before it goes."""
    def keep() -> Callable[[], None]:
        data = path.read_bytes()

        def send() -> None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / path.name).write_bytes(data)
                upload(Path(tmp) / path.name)

        return send

    return (lambda: upload(path)), keep


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
        if not _server_answers(uri):
            raise UserError(
                f"the MLflow tracking server at {public_uri(uri)} is unreachable; start it, point "
                "MLFLOW_TRACKING_URI elsewhere (unset: the local mlflow.db), or set "
                "tracking.enabled: false in params.yaml"
            )
        check_login(uri)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
        if not os.access(folder, os.W_OK):
            raise UserError(f"the MLflow store {uri}: folder {folder} is not writable")


def check_login(uri: str) -> None:
    """A server with authentication (`mlflow server --app-name basic-auth`) must accept the login
    of MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as err:
        if _refusal(err):
            raise refusal_error(err, uri, "to read its experiments") from None
        raise


def _refusal(err: BaseException) -> bool:
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


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def _server_answers(uri: str) -> bool:
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        return True
    except requests.RequestException:
        return False


class Terminated(BaseException):
    """SIGTERM, raised so the run is closed as KILLED like Ctrl-C."""


@contextmanager
def tracked_run(cfg: Tracking, experiment: str, run_name: str, tags: dict[str, Any],
                continue_run: str | None = None, evaluation: bool = False) -> Iterator[Tracker]:
    """The MLflow run of one stage execution, for the block.

    continue_run: a run this stage may add to (a resumed training's own run; for an evaluation,
    the training run of its checkpoint). It is reopened only if `may_continue` allows; otherwise
    a new run is started. `tags` are set on the run either way.

    The run ends FINISHED when the block completes, FAILED when it raises, KILLED on Ctrl-C or
    SIGTERM (SIGTERM then exits with status 143). A tracking server lost during the block is
    reported as a UserError naming it.
    """
    if not cfg.enabled:
        print("tracking: off (tracking.enabled: false in params.yaml); nothing goes to MLflow")
        yield Tracker(None)
        return
    uri = tracking_uri()
    check_reachable(uri)
    import mlflow

    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    name = cfg.experiment or experiment
    tags = {k: str(v) for k, v in tags.items()}  # a server takes strings only (SQLite, anything)
    lock = store_lock(uri)
    try:
        with lock:  # a new store is created here, by one stage at a time
            run_id = continue_run if continue_run and may_continue(continue_run, evaluation) else None
            run = mlflow.start_run(run_id=run_id,
                                   experiment_id=None if run_id else _experiment_id(name, uri),
                                   run_name=None if run_id else run_name, tags=tags)
    except MlflowException as err:
        if _refusal(err):
            raise refusal_error(err, uri, f"to add a run to experiment {name!r}", name) from None
        raise
    print(f"tracking: MLflow run {run.info.run_id} ({'reopened' if run_id else 'new'}) in "
          f"experiment '{name}' at {public_uri(uri)}", flush=True)
    on_main_thread = threading.current_thread() is threading.main_thread()  # signals: main only
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    previous = previous if previous is not None else signal.SIG_DFL  # None: not set from Python
    end = lambda status: _end_run(status, on_main_thread, previous, lock)  # noqa: E731
    tracker = Tracker(run.info.run_id, reopened=bool(run_id), lock=lock, uri=uri)
    try:
        yield tracker
        if not tracker.flush_patiently(cfg.patience):
            raise UserError(
                f"lost the MLflow tracking server at {public_uri(uri)}: it did not answer for "
                f"{cfg.patience:g} s (tracking.patience), and run {run.info.run_id} lacks "
                f"{', '.join(tracker.pending)}; this stage's work is kept (resumable state, "
                "checkpoints): when the server is back, `dvc repro` sends what the run lacks")
    except Terminated:
        end("KILLED")
        print(f"terminated (SIGTERM); MLflow run {run.info.run_id} ended KILLED", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except KeyboardInterrupt:
        end("KILLED")
        raise
    except BaseException as err:
        end("FAILED")
        if _refusal(err):
            raise refusal_error(err, uri, f"to write to run {run.info.run_id} of experiment "
                                f"{name!r}", name) from None
        if _server_gone(err, uri):
            raise UserError(f"lost the MLflow tracking server at {public_uri(uri)} during run "
                            f"{run.info.run_id}: {_first_line(err)}") from None
        raise
    else:
        end("FINISHED")


def may_continue(run_id: str, evaluation: bool = False) -> bool:
    """Whether this stage execution may add to the run `run_id`: it exists, it belongs to the
    DVC experiment now running (tag `rnnlab.dvc_exp`; none = the workspace's `dvc repro`), and,
    for an evaluation, it holds no evaluation yet. Anything else gets a run of its own, so no
    stage ever rewrites another experiment's record."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.get_run(run_id)
    except MlflowException:
        return False  # the store was reset or changed
    if run.info.lifecycle_stage == "deleted":
        return False
    tags = run.data.tags
    if tags.get("rnnlab.dvc_exp") != os.environ.get("DVC_EXP_NAME"):
        return False
    return not (evaluation and tags.get("rnnlab.evaluated") == "true")


def _end_run(status: str, on_main_thread: bool, previous, lock: AbstractContextManager) -> None:
    """End the active run with `status`, deaf to a second SIGTERM meanwhile. Called while an
    exception is on its way up, a store that cannot be reached is reported, not raised, so the
    original error is the one shown."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if on_main_thread:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with lock:
            mlflow.end_run(status)
    except (MlflowException, requests.RequestException) as err:
        if status == "FINISHED":
            raise
        print(f"tracking: could not mark the run {status} ({str(err).splitlines()[0]}); "
              "it stays RUNNING in the store", file=sys.stderr)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _server_gone(err: BaseException, uri: str | None) -> bool:
    """`err` came from a tracking server that no longer answers /health (a connection failure, a
    5xx while it restarts). A refusal or a bad value is a real error, whatever the server does."""
    return (uri is not None and uri.startswith(("http://", "https://")) and _is_tracking_error(err)
            and not _refusal(err) and not _server_answers(uri))


def _is_tracking_error(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(err, (MlflowException, requests.RequestException))


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _experiment_id(name: str, uri: str) -> str:
    """The experiment's id, creating it (artifacts beside a SQLite store) if it is new."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, name))
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # created meanwhile by a parallel stage
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise UserError(f"the MLflow experiment '{name}' at {uri} is deleted; restore it "
                        f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or "
                        "set tracking.experiment in params.yaml to another name")
    return exp.experiment_id


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
