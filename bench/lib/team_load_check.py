"""What a team load writer logs, as a pure function of its index, and the check that the backend
store holds exactly that: FINISHED runs, every param and tag, every metric's history."""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from bench.lib import ROOT


def metric_keys(n: int) -> list[str]:
    """The per-epoch metrics: the curve fields less `epoch` (the step), then `extra_<i>` if n is
    larger."""
    from rnnlab.tracking.records import CURVE_FIELDS

    curve = [k for k in CURVE_FIELDS if k != "epoch"]
    return curve[:n] + [f"extra_{i}" for i in range(1, n - len(curve) + 1)]


def epoch_metrics(keys: list[str], writer: int, epoch: int) -> dict[str, float]:
    """Epoch `epoch`'s values for writer `writer`: distinct per writer, epoch and key, six
    significant digits as record_curves rounds them."""
    return {k: float(f"{100.0 / epoch + writer + i / 8:.6g}") for i, k in enumerate(keys)}


def summary_metrics(writer: int, epochs: int, train_seconds: float) -> dict[str, float]:
    """The train stage's summary (stages/train.py), under its MLflow names (`summary.<key>` for a
    curve field), as record_summary logs it."""
    from rnnlab.tracking.records import mlflow_name

    summary = {"best_epoch": epochs, "best_val_ppl": 100.0 / max(epochs, 1) + writer,
               "final_train_ppl": 100.0 / max(epochs, 1) + writer, "epochs": epochs,
               "tokens_per_sec": 1e5 + writer, "train_seconds": train_seconds, "parameters": 12345}
    return {mlflow_name(k): float(f"{v:.6g}") for k, v in summary.items()}


def run_record() -> tuple[dict, dict]:
    """The params and tags stages/train.py gives a run of params.yaml's first variant."""
    from rnnlab.config import load_params, resolve_train
    from rnnlab.models.lm import build_model, model_config
    from rnnlab.tracking.records import run_params
    from rnnlab.tracking.tags import dvc_tags, git_tags

    params = load_params(ROOT / "params.yaml")
    variant = next(iter(params.variants))
    model = build_model(model_config(params.variants[variant], resolve_train(params, variant), 28))
    n_params = sum(p.numel() for p in model.parameters())
    tags = {**git_tags(), **dvc_tags(f"train@{variant}", ROOT / "params.yaml"),
            "rnnlab.variant": variant, "rnnlab.bench": "team_load"}
    return run_params(params, variant, model.config, n_params), tags


def verify(result: dict, job: dict, store: str, store_env: dict[str, str]) -> dict:
    """Read every run back from the backend store `store` (for the server: its PostgreSQL
    database, not the REST API, whose every call costs a password check); count what is missing
    or wrong. Every count must be zero."""
    from mlflow import MlflowClient

    lost = Counter()
    cwd = os.getcwd()
    os.chdir(job["cwd"])
    try:
        with environment(store_env):
            client = MlflowClient(store)
            experiment = client.get_experiment_by_name(job["experiment"])
            runs = client.search_runs([experiment.experiment_id], max_results=1000)
            ids = {r["run_id"] for r in result["results"]}
            lost["runs missing"] += len(ids - {r.info.run_id for r in runs})
            lost["runs extra"] += sum(1 for r in runs if r.info.run_id not in ids
                                      and r.data.tags.get("rnnlab.bench") != "team_load setup")
            for r in result["results"]:
                run = client.get_run(r["run_id"])
                lost["runs not FINISHED"] += run.info.status != "FINISHED"
                want_params = {k: str("null" if v is None else v) for k, v in job["params"].items()}
                lost["params"] += sum(run.data.params.get(k) != v for k, v in want_params.items())
                want_tags = {**job["tags"], "rnnlab.writer": r["index"]}
                lost["tags"] += sum(run.data.tags.get(k) != str(v) for k, v in want_tags.items())
                expected = {k: {} for k in job["keys"]}
                for epoch in range(1, job["epochs"] + 1):
                    for k, v in epoch_metrics(job["keys"], r["index"], epoch).items():
                        expected[k][epoch] = v
                summary = summary_metrics(r["index"], job["epochs"],
                                          job["train_seconds"] * job["epochs"])
                for k, v in summary.items():
                    expected[k] = {0: v}  # no step: MLflow's step 0
                for key, points in expected.items():
                    history = client.get_metric_history(r["run_id"], key)
                    got = Counter((m.step, m.value) for m in history)
                    lost["metric points missing"] += sum(got[(s, v)] == 0 for s, v in points.items())
                    for (step, value), n in got.items():  # a wrong value, or a point twice
                        lost["metric points extra or wrong"] += n - 1 if points.get(step) == value else n
    finally:
        os.chdir(cwd)
    return {k: lost[k] for k in ("runs missing", "runs extra", "runs not FINISHED", "params", "tags",
                                 "metric points missing", "metric points extra or wrong")}


@contextmanager
def environment(env: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    """os.environ with `env` set and `unset` removed, for the block (this process's MLflow)."""
    saved = {k: os.environ.get(k) for k in [*env, *unset]}
    os.environ.update(env)
    for key in unset:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
