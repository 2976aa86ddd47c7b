"""The benchmark's figures beyond the training step: the seconds of a no-op `dvc repro`, and the
share of a training run spent in MLflow tracking."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bench.lib.book_vs_ours import ours_step
from bench.lib.clone import tiny_clone
from bench.lib.streams import minibatches
from bench.lib.timing import synchronize
from rnnlab.models.lm import ModelConfig, build_model


def noop_repro_seconds(work: Path) -> dict:
    """Seconds of `dvc repro` when nothing changed: in a git clone of HEAD with tiny params,
    the first repro runs every stage, the second (timed) should find nothing to do."""
    repo, env, dvc = tiny_clone(work)
    first, _ = timed_repro(repo, env, dvc)
    second, out = timed_repro(repo, env, dvc)
    return {"first_repro_seconds": first, "noop_repro_seconds": second,
            "noop_ran_a_stage": "Running stage" in out}


def timed_repro(repo: Path, env: dict, dvc: str) -> tuple[float, str]:
    """`dvc repro` in `repo`: (its seconds, what it printed)."""
    t0 = time.perf_counter()
    proc = subprocess.run([dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"dvc repro failed in {repo}:\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def tracking_share(cfg: ModelConfig, ids: torch.Tensor, work: Path, epochs: int, batch: int,
                   num_steps: int, device: torch.device = torch.device("cpu")) -> dict:
    """Seconds of the tracking calls a training run makes (record_curves each epoch, then
    record_summary) with a real MLflow run in a local SQLite store (made by an earlier run, as in
    the pipeline), against the time of an epoch of the same model at these settings (batches per
    epoch x the measured seconds per minibatch; the optimizer is SGD, the pipeline's Adam costs a
    little more)."""
    from rnnlab.config import Tracking
    from rnnlab.data.batches import num_batches
    from rnnlab.tracking.records import record_curves, record_summary
    from rnnlab.tracking.runs import tracked_run

    torch.manual_seed(0)
    step = ours_step(build_model(cfg).to(device), 1.0, 1.0)
    batches = minibatches(ids, batch, num_steps, 12, device)
    for x, y in batches[:2]:
        step(x, y)
    synchronize(device)
    t0 = time.perf_counter()
    for x, y in batches[2:]:
        step(x, y)
    synchronize(device)
    step_seconds = (time.perf_counter() - t0) / (len(batches) - 2)
    per_epoch = num_batches(len(ids), batch, num_steps)
    epoch_seconds = per_epoch * step_seconds

    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    history, curves = [], []
    tracking = Tracking(enabled=True, experiment="bench", patience=0, register=None)
    try:
        with tracked_run(tracking, "bench", "bench-setup", {}):
            pass  # creates the store and the experiment, as the pipeline's first run does
        t0 = time.perf_counter()
        with tracked_run(tracking, "bench", "bench", {}) as tracker:
            started = time.perf_counter() - t0
            for epoch in range(1, epochs + 1):
                history.append({"epoch": epoch, "train_ppl": 10.0 / epoch, "val_ppl": 11.0 / epoch,
                                "tokens_per_sec": 1e5, "grad_norm": 0.5, "clipped_frac": 0.1,
                                "lr": 1.0, "seconds": epoch_seconds})
                t1 = time.perf_counter()
                record_curves(work / "curves.csv", history, tracker)
                curves.append(time.perf_counter() - t1)
            t1 = time.perf_counter()
            record_summary(work / "train.json", {"best_epoch": epochs, "best_val_ppl": 1.0,
                                                 "epochs": epochs, "device": str(device)}, tracker)
            summary = time.perf_counter() - t1
            t1 = time.perf_counter()
        ended = time.perf_counter() - t1
    finally:
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    recorded = sum(curves) + summary
    train_seconds = epochs * epoch_seconds
    return {
        "epoch_seconds": epoch_seconds, "batches_per_epoch": per_epoch, "epochs": epochs,
        "run_start_seconds": started, "run_end_seconds": ended,
        "record_curves_seconds_median": statistics.median(curves),
        "record_summary_seconds": summary,
        "share_of_training": recorded / train_seconds,
        "share_with_run_start_and_end": (recorded + started + ended) / train_seconds,
    }
