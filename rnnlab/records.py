"""The record of a run: DVC's metrics and plots files, mirrored to MLflow by the same functions.

Numbers are rounded once, here, before they are written to both places, so `dvc metrics show`
and the MLflow run agree to the digit.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rnnlab.fileio import write_json, write_text
from rnnlab.tracking import Tracker

CURVE_FIELDS = ("epoch", "train_ppl", "val_ppl", "tokens_per_sec", "grad_norm", "clipped_frac",
                "lr", "seconds")


def rounded(x: float | int) -> float | int:
    """Six significant digits: enough to compare runs, short enough to read."""
    return x if isinstance(x, int) else float(f"{x:.6g}")


def record_curves(path: str | Path, history: list[dict], tracker: Tracker) -> None:
    """Write every epoch so far to the DVC plots file; log the newest epoch to MLflow."""
    rows = [{k: rounded(row[k]) for k in CURVE_FIELDS} for row in history]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
    last = rows[-1]
    tracker.log_metrics({k: v for k, v in last.items() if k != "epoch"}, step=last["epoch"])


def record_summary(path: str | Path, summary: dict, tracker: Tracker) -> dict:
    """Write a metrics JSON file for DVC and log its numbers to MLflow as summary metrics."""
    summary = {k: rounded(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
               for k, v in summary.items()}
    write_json(path, summary)
    tracker.log_metrics({k: v for k, v in summary.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return summary
