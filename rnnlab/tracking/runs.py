"""MLflow: each stage execution records its numbers in a run of the experiment that executed it.

`stage_run` opens the run of one variant's stage: `train@<v>` starts a new run, or continues its
own resumed one; `evaluate@<v>` adds to the training's run when the same DVC experiment made it
and it holds no evaluation yet, else gets a run of its own linked by `rnnlab.train_run_id`
(docs/tracking.md, "Runs and DVC experiments"). No stage writes into another experiment's run
(`rnnlab.dvc_exp`). Where runs go: MLFLOW_TRACKING_URI, else mlflow.db at the repository root
(rnnlab/tracking/store.py). A run ends FINISHED, FAILED when the stage raises, KILLED on Ctrl-C
or SIGTERM; a server lost meanwhile loses nothing for `tracking.patience` s (docs/team.md).
"""


from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Iterator

import requests

from rnnlab import phases
from rnnlab.config import Tracking
from rnnlab.errors import UserError
from rnnlab.redact import public_uri
from rnnlab.tracking.store import (
    artifact_location,
    check_reachable,
    first_line,
    is_refusal,
    refusal_error,
    server_gone,
    store_lock,
    tracking_uri,
)
from rnnlab.tracking.tags import dvc_tags, git_tags
from rnnlab.tracking.tracker import Tracker


class Terminated(BaseException):
    """SIGTERM, raised so the run is closed as KILLED like Ctrl-C."""


def experiment_name(stats: dict) -> str:
    """The experiment of a corpus's runs (unless tracking.experiment names one), from the tokenize
    stage's stats: `<corpus>-<token type>`, e.g. timemachine-char."""
    return f"{stats['corpus']}-{stats['token']}"


@contextmanager
def stage_run(cfg: Tracking, variant: str, experiment: str, data_sha1: str,
              params_path: str | Path, continue_run: str | None = None,
              evaluation: bool = False) -> Iterator[Tracker]:
    """`tracked_run` of the stage train@`variant`, or evaluate@`variant` with `evaluation`.

    The run is named `<variant> [<DVC_EXP_NAME>]` (`<variant>` outside an experiment) and tagged
    with what made it: git, DVC (the stage: DVC_STAGE, else `train@<variant>`), the variant and
    the data's sha1; a training's run also with its PyTorch threads. An evaluation's run is
    marked `rnnlab.evaluated` and names its training (`continue_run`) in `rnnlab.train_run_id`;
    added to that training's run it leaves the training's tags as they are, and in a run of its
    own it sets them, with a note of where its checkpoint was trained.
    """
    def made_by() -> dict[str, Any]:
        stage = os.environ.get("DVC_STAGE", f"{'evaluate' if evaluation else 'train'}@{variant}")
        return {**git_tags(), **dvc_tags(stage, params_path), "rnnlab.variant": variant,
                "rnnlab.data_sha1": data_sha1}

    if evaluation:
        tags = {"rnnlab.evaluated": "true",
                **({"rnnlab.train_run_id": continue_run} if continue_run else {})}
    else:
        import torch

        tags = {**made_by(), "rnnlab.threads": torch.get_num_threads()}
    exp = os.environ.get("DVC_EXP_NAME")
    with tracked_run(cfg, experiment, f"{variant} [{exp}]" if exp else variant, tags,
                     continue_run=continue_run, evaluation=evaluation) as tracker:
        if evaluation and not tracker.reopened:  # a run of its own: its training's is elsewhere
            tracker.set_tags({**made_by(), "mlflow.note.content": restored_note(continue_run)})
        yield tracker


def restored_note(train_run: str | None) -> str:
    """The description of an evaluation's own run (docs/tracking.md)."""
    trained = f"MLflow run {train_run}" if train_run else "a run without tracking"
    return (f"Evaluation of a checkpoint this experiment did not train itself (DVC restored the "
            f"training from its cache, or it was evaluated before): trained in {trained}.")


@contextmanager
def tracked_run(cfg: Tracking, experiment: str, run_name: str, tags: dict[str, Any],
                continue_run: str | None = None, evaluation: bool = False) -> Iterator[Tracker]:
    """The MLflow run of one stage execution, for the block.

    continue_run: a run this stage may add to (a resumed training's own run; for an evaluation,
    the training run of its checkpoint). It is reopened only if `may_continue` allows; otherwise
    a new run is started. `tags` are set on the run either way.

    A server that does not answer, or refuses the login, is a UserError before the block. The
    run ends FINISHED when the block completes, FAILED when it raises, KILLED on Ctrl-C or
    SIGTERM (SIGTERM then exits with status 143). Writes that wait for a server lost during the
    block are sent for up to `cfg.patience` s at its end; after that, a UserError names them.
    """
    if not cfg.enabled:
        print("tracking: off (tracking.enabled: false in params.yaml); nothing goes to MLflow")
        yield Tracker(None)
        return
    with phases.phase("tracking"):
        uri, name, lock, run_id, trained_until, run = _start(cfg, experiment, run_name, tags,
                                                              continue_run, evaluation)
    print(f"tracking: MLflow run {run.info.run_id} ({'reopened' if run_id else 'new'}) in "
          f"experiment '{name}' at {public_uri(uri)}", flush=True)
    on_main_thread = threading.current_thread() is threading.main_thread()  # signals: main only
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    previous = previous if previous is not None else signal.SIG_DFL  # None: not set from Python
    end = lambda status: _end_run(status, on_main_thread, previous, lock, trained_until)  # noqa: E731
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
        if is_refusal(err):
            raise refusal_error(err, uri, f"to write to run {run.info.run_id} of experiment "
                                f"{name!r}", name) from None
        if server_gone(err, uri):
            raise UserError(f"lost the MLflow tracking server at {public_uri(uri)} during run "
                            f"{run.info.run_id}: {first_line(err)}") from None
        raise
    else:
        end("FINISHED")


def _start(cfg: Tracking, experiment: str, run_name: str, tags: dict[str, Any],
           continue_run: str | None, evaluation: bool):
    """`tracked_run`'s opening: the store, the experiment, the run started or reopened."""
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
            # an evaluation added to its training's run leaves the run's times the training's
            # (the UI's Duration); its own time is its metric eval_seconds
            trained_until = mlflow.get_run(run_id).info.end_time if run_id and evaluation else None
            run = mlflow.start_run(run_id=run_id,
                                   experiment_id=None if run_id else _experiment_id(name, uri),
                                   run_name=None if run_id else run_name, tags=tags)
    except MlflowException as err:
        if is_refusal(err):
            raise refusal_error(err, uri, f"to add a run to experiment {name!r}", name) from None
        raise
    return uri, name, lock, run_id, trained_until, run


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


def _end_run(status: str, on_main_thread: bool, previous, lock: AbstractContextManager,
             end_time: int | None = None) -> None:
    """End the active run with `status` (at `end_time`, ms since the epoch, if given: a reopened
    run's own end), deaf to a second SIGTERM meanwhile. Called while an exception is on its way
    up, a store that cannot be reached is reported, not raised, so the original error is the one
    shown."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if on_main_thread:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with phases.phase("tracking"), lock:
            run_id = mlflow.active_run().info.run_id
            mlflow.end_run(status)
            if end_time is not None:
                mlflow.MlflowClient().set_terminated(run_id, status, end_time=end_time)
    except (MlflowException, requests.RequestException) as err:
        if status == "FINISHED":
            raise
        print(f"tracking: could not mark the run {status} ({str(err).splitlines()[0]}); "
              "it stays RUNNING in the store", file=sys.stderr)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


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
        raise UserError(f"the MLflow experiment '{name}' at {public_uri(uri)} is deleted; restore it "
                        f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or "
                        "set tracking.experiment in params.yaml to another name")
    return exp.experiment_id
