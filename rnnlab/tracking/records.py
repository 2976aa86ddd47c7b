"""The record of a run: DVC's metrics and plots files, mirrored to MLflow by the same functions.

Numbers are rounded once, here, before they are written to both places, so `dvc metrics show`
and the MLflow run agree to the digit.

In MLflow the per-epoch numbers are series with step = epoch (`train_ppl`, `val_ppl`, ...). A
summary number whose name is also a series (evaluate's `train_ppl`, `val_ppl`, the mean
`tokens_per_sec`) is logged as `summary.<name>`, so each series stays one point per epoch and the
run's latest value of a name is never a mix of the two; every other summary number keeps its
name (`best_val_ppl`, `best_epoch`, `test_ppl`, ...). `mlflow_name` is that rule.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path

from rnnlab.config import Params, flatten, resolve_train
from rnnlab.fileio import atomic_path, write_json, write_text
from rnnlab.models.lm import ModelConfig
from rnnlab.tracking.tracker import Tracker

CURVE_FIELDS = ("epoch", "train_ppl", "val_ppl", "tokens_per_sec", "grad_norm", "clipped_frac",
                "lr", "seconds")
SUMMARY_PREFIX = "summary."


def rounded(x: float | int) -> float | int:
    """Six significant digits: enough to compare runs, short enough to read."""
    return x if isinstance(x, int) else float(f"{x:.6g}")


def mlflow_name(key: str) -> str:
    """The MLflow metric name of a summary (metrics JSON) key."""
    return SUMMARY_PREFIX + key if key in CURVE_FIELDS else key


def run_params(params: Params, variant: str, model: ModelConfig, n_params: int) -> dict:
    """The MLflow params of a variant's run: the data and tokenize sections, the variant's
    resolved training settings (`train.*`, overrides applied) and its model (`model.*`)."""
    return {**flatten({"data": params.data, "tokenize": params.tokenize,
                       "train": resolve_train(params, variant), "model": asdict(model)}),
            "variant": variant, "model.parameters": n_params}


def record_curves(path: str | Path, history: list[dict], tracker: Tracker,
                  resumed: bool = False) -> None:
    """Write every epoch so far to the DVC plots file; log the newest epoch to MLflow.

    resumed: log every epoch of `history` that the MLflow run lacks instead (a run killed between
    saving its resumable state and logging an epoch gets that epoch once, not twice or never).
    """
    rows = [{k: rounded(row[k]) for k in CURVE_FIELDS} for row in history]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
    if resumed:
        logged = tracker.logged_steps("val_ppl")
        to_log = [row for row in rows if row["epoch"] not in logged]
    else:
        to_log = rows[-1:]
    for row in to_log:
        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])


def record_curves_png(path: str | Path, history: list[dict], tracker: Tracker,
                      title: str | None = None) -> None:
    """Draw train and validation perplexity per epoch to a PNG; log it to MLflow (`curves/`)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(epochs, [row["train_ppl"] for row in history], marker="o", ms=3, label="train")
    ax.plot(epochs, [row["val_ppl"] for row in history], marker="o", ms=3, label="validation")
    ax.set(xlabel="epoch", ylabel="perplexity", yscale="log",
           title=f"{title}: perplexity per epoch" if title else "Perplexity per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    tracker.log_artifact(path, "curves")


def record_summary(path: str | Path, summary: dict, tracker: Tracker) -> dict:
    """Write a metrics JSON file for DVC and log its numbers to MLflow as summary metrics."""
    summary = {k: rounded(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
               for k, v in summary.items()}
    write_json(path, summary)
    tracker.log_metrics({mlflow_name(k): v for k, v in summary.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return summary
