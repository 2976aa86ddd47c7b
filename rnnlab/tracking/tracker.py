"""`Tracker`: the writes of one MLflow run (params, metrics, tags, artifacts, the model), sent
in order; while the tracking server does not answer they wait, and the training goes on."""

from __future__ import annotations

import sys
import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

from rnnlab import phases
from rnnlab.redact import public_uri
from rnnlab.tracking.store import first_line, server_answers, server_gone


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
        with phases.phase("tracking"):
            return self._flush()

    def _flush(self) -> bool:
        if self._pending and self._outage_reported and not server_answers(self._uri or ""):
            return False  # still away: ask /health (fast), not the client (it retries for seconds)
        while self._pending:
            what, send = self._pending[0]
            try:
                with self._lock:
                    send()
            except Exception as err:
                if not server_gone(err, self._uri):
                    raise
                if not self._outage_reported:
                    print(f"tracking: the MLflow server at {public_uri(self._uri or '')} does not "
                          f"answer ({first_line(err)}); the run's writes wait until it is back",
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
        """The checkpoint as the run's MLflow Model `model` (rnnlab/tracking/mlflow_model.py)."""
        if self.run_id:
            from rnnlab.tracking.mlflow_model import NAME, log_model

            def send(file: Path) -> None:
                seconds = log_model(file, example)
                print(f"tracking: logged the MLflow Model runs:/{self.run_id}/{NAME} "
                      f"({seconds:.1f} s)", flush=True)

            self._write(f"model {NAME}", *_from_file(Path(checkpoint), send))

    def register(self, name: str, train_run: str, val_ppl: float, data_sha1: str) -> None:
        """Register the model of `train_run` in the Model Registry if it beats the champion."""
        if self.run_id:
            from rnnlab.tracking.registry import register_if_better

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
            self._write("dataset", lambda: _log_input(dataset, context))


def _log_input(dataset, context: str) -> None:
    """mlflow.log_input, once more if another stage made the same dataset at the same moment: the
    server looks a dataset up and inserts it if missing, not atomically, so two trainings on the
    same data starting together (two machines, a sweep) can collide on its key; the second try
    finds the dataset and links this run to it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as err:
        text = str(err)
        if "dataset" not in text or not ("duplicate key" in text or "UNIQUE constraint" in text):
            raise
        mlflow.log_input(dataset, context=context)


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
