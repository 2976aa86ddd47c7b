"""The comparison table of trained variants, as Markdown or CSV: `rnnlab compare`, the `report`
stage and `python -m rnnlab.cli.presets --results` all print it.

A row is a dict: the results of one (experiment or run, variant), keyed as in the metrics JSON
(`train_ppl`, `test_ppl`, `best_epoch`, ...; None where unknown), plus its `settings`, flat
(`train.lr`, `model.cell`, ...) and written as MLflow writes params (`str(value)`, None as
`null`). The table shows the results, then one column per setting that is not the same in every
row. Few imports on purpose: the `report` stage imports it, so what it imports are its deps.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Callable

from rnnlab.config import Params, flatten, resolve_train

SECTIONS = ("model", "train", "data", "tokenize", "evaluate")  # settings, in the order shown
RESULT_KEYS = ("train_ppl", "val_ppl", "test_ppl", "best_epoch", "epochs", "tokens_per_sec", "train_seconds",
               "uniform_ppl", "final_train_ppl", "best_val_ppl")  # every row has these, None where unknown


@dataclass(frozen=True)
class Column:
    key: str                   # the row's key; a settings key if `setting`
    header: str
    fmt: str | Callable[[dict], str] = ""  # Markdown: a format spec for the value, or the cell from the row
    number: bool = False       # right-aligned in Markdown
    setting: bool = False

    def value(self, row: dict) -> Any:
        return (row.get("settings") or {}).get(self.key) if self.setting else row.get(self.key)

    def cell(self, row: dict) -> str:
        """The Markdown cell: formatted, `|` escaped, `-` for a missing value."""
        if callable(self.fmt):
            text = self.fmt(row)
        else:
            value = self.value(row)
            text = "-" if value is None else format(value, self.fmt)
        return " ".join(str(text).split()).replace("|", "\\|")


def _best_epoch(row: dict) -> str:
    best, epochs = row.get("best_epoch"), row.get("epochs")
    return "-" if best is None else f"{best}/{epochs}" if epochs is not None else str(best)


RESULTS = (
    Column("train_ppl", "train ppl", ".3f", number=True),
    Column("val_ppl", "val ppl", ".3f", number=True),
    Column("test_ppl", "test ppl", ".3f", number=True),
    Column("best_epoch", "best epoch", _best_epoch, number=True),
    Column("tokens_per_sec", "tokens/s", ",.0f", number=True),
    Column("train_seconds", "train s", ".0f", number=True),
)
SOURCE = Column("source", "experiment")
VARIANT = Column("variant", "variant")


def setting_text(value: Any) -> str:
    """A setting as MLflow records it (Tracker.log_params, rnnlab/tracking/tracker.py)."""
    return "null" if value is None else str(value)


def variant_settings(params: Params, name: str) -> dict[str, str]:
    """Every setting of one variant under the names of its MLflow params (records.run_params):
    `model.*` (cell, impl, num_layers, embed_size, tie_weights), its resolved `train.*` (overrides applied),
    `data.*`, `tokenize.*` and `evaluate.*`."""
    v = params.variants[name]
    model = {"cell": v.cell, "impl": v.impl, "num_layers": v.num_layers, "embed_size": v.embed_size,
             "tie_weights": v.tie_weights}
    flat = flatten({"model": model, "train": resolve_train(params, name), "data": params.data,
                    "tokenize": params.tokenize, "evaluate": params.evaluate})
    return {k: setting_text(value) for k, value in flat.items()}


def row(source: str, variant: str, results: dict, params: Params) -> dict:
    """The row of one variant: its metrics JSON (evaluate's; {} if it has not run) and the params
    it ran with."""
    return {**dict.fromkeys(RESULT_KEYS), **results, "source": source, "variant": variant,
            "evaluated": bool(results), "settings": variant_settings(params, variant)}


def differing(rows: list[dict], always: tuple[str, ...] = ()) -> list[str]:
    """The settings with more than one value among the rows, and `always`: by section
    (SECTIONS), then in the order the rows first name them. A row without a setting (an MLflow
    run that recorded no evaluate.*) does not count as another value."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row.get("settings") or {}))
    values = {k: {(row.get("settings") or {}).get(k) for row in rows} - {None} for k in seen}
    keys = [k for k in seen if k in always or len(values[k]) > 1]
    order = {k: i for i, k in enumerate(seen)}
    rank = {s: i for i, s in enumerate(SECTIONS)}
    return sorted(keys, key=lambda k: (rank.get(k.split(".")[0], len(rank)), order[k]))


def by_test_ppl(row: dict) -> tuple:
    """Sort key: the best held-out perplexity first, rows without one last."""
    ppl = row.get("test_ppl")
    return (ppl is None, ppl if ppl is not None else 0.0, str(row.get("source", "")), str(row.get("variant", "")))


def comparison(rows: list[dict], lead: tuple[Column, ...] = (SOURCE, VARIANT), extra: tuple[Column, ...] = (),
               fmt: str = "markdown", always: tuple[str, ...] = ()) -> str:
    """The table: `lead` (what each row is), the results, `extra`, then the differing settings."""
    settings = tuple(Column(k, k, setting=True) for k in differing(rows, always))
    return render(rows, (*lead, *RESULTS, *extra, *settings), fmt)


def render(rows: list[dict], columns: tuple[Column, ...], fmt: str = "markdown") -> str:
    """A GitHub Markdown table (formatted cells) or CSV (the values as they are, '' for none)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([c.header for c in columns])
        writer.writerows([["" if c.value(r) is None else c.value(r) for c in columns] for r in rows])
        return buf.getvalue()
    if fmt != "markdown":
        raise ValueError(f"table format {fmt!r}: allowed: markdown, csv")
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---:" if c.number else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"

