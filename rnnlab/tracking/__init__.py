"""The record of runs: MLflow runs, DVC's metrics files and their mirror, the MLflow Model.

    store.py         where runs go (MLFLOW_TRACKING_URI or mlflow.db), the SQLite lock, logins
    runs.py          `stage_run`: the MLflow run of one stage execution, ended as it ended
    tracker.py       `Tracker`: the run's writes, in order, waiting out a server's outage
    tags.py          the tags that link a run to git and DVC; records.py: DVC's metrics files
    mlflow_model.py  the checkpoint as an MLflow Model; registry.py: the Model Registry
    table.py         the one comparison table (rnnlab compare, the report stage, presets)

Both tools phone home unless told not to: this package turns that off before MLflow is imported.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")     # a hung server, not 120 s a call
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for kilobytes
