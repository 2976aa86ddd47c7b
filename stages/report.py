"""DVC stage `report`: one comparison of all variants (a Markdown table and PNG plots)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

from rnnlab.config import Params, load_params  # noqa: E402
from rnnlab.errors import UserError, run_program  # noqa: E402
from rnnlab.fileio import atomic_path, read_json, write_text  # noqa: E402
from rnnlab.tracking.table import VARIANT, by_test_ppl, comparison, row  # noqa: E402


def read_curves(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


MODEL = ("model.cell", "model.impl", "model.num_layers", "train.hidden_size")  # shown even when all alike


def report_table(params: Params, metrics: dict[str, dict]) -> str:
    """The comparison table (rnnlab/tracking/table.py) of every variant, best test perplexity first: the
    model columns, then each setting in which the variants differ (a variant's train overrides)."""
    rows = sorted((row("workspace", name, m, params) for name, m in metrics.items()), key=by_test_ppl)
    uniform = next(iter(metrics.values()))["uniform_ppl"]
    return (comparison(rows, lead=(VARIANT,), always=MODEL)
            + f"\nA uniform model's perplexity (the vocabulary size): {uniform}.\n")


def plot_val(curves: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        ax.plot([r["epoch"] for r in rows], [r["val_ppl"] for r in rows], marker="o", ms=3, label=name)
    ax.set(xlabel="epoch", ylabel="validation perplexity", title="Validation perplexity per epoch")
    _log_y(ax)
    ax.legend()
    _save(fig, path)


def plot_train_val(curves: dict[str, list[dict]], path: Path) -> None:
    n = len(curves)
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False, sharey=True)
    for ax, (name, rows) in zip(axes.flat, curves.items()):
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["train_ppl"] for r in rows], label="train")
        ax.plot(epochs, [r["val_ppl"] for r in rows], label="validation")
        ax.set(title=name, xlabel="epoch")
        _log_y(ax)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel("perplexity")
    axes[0][0].legend()
    fig.tight_layout()
    _save(fig, path)


def _log_y(ax) -> None:
    """A log perplexity axis labelled with plain numbers (5, 6, 10), not 6x10^0."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.grid(True, which="both", alpha=0.3)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", required=True, help="folder of evaluate's <variant>.json")
    parser.add_argument("--curves", required=True, help="folder of train's <variant>.csv")
    parser.add_argument("--out", required=True, help="report Markdown to write")
    parser.add_argument("--plots", required=True, help="folder for the PNG plots")
    args = parser.parse_args()

    params = load_params(args.params)
    metrics, curves = {}, {}
    for name in params.variants:
        m, c = Path(args.metrics) / f"{name}.json", Path(args.curves) / f"{name}.csv"
        if not m.is_file() or not c.is_file():
            raise UserError(f"no results for variant {name!r} ({m}, {c}); run its train and evaluate stages")
        metrics[name], curves[name] = read_json(m), read_curves(c)
    plots = Path(args.plots)
    plot_val(curves, plots / "val_ppl.png")
    plot_train_val(curves, plots / "train_val.png")
    s = params.data
    table = report_table(params, metrics)
    write_text(args.out, f"# Report: {s.corpus}, {params.tokenize.token} tokens\n\n{table}\n"
               f"![validation perplexity](plots/val_ppl.png)\n\n![train and validation](plots/train_val.png)\n")
    print(table)
    print(f"report: {args.out}; plots: {plots / 'val_ppl.png'}, {plots / 'train_val.png'}")


if __name__ == "__main__":
    run_program(main)
