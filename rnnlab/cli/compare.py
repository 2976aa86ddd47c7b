"""`rnnlab compare [NAME ...]`: one table of the results of DVC experiments, the workspace and
MLflow runs, with a column for each setting that differs among them (the table:
rnnlab/tracking/table.py; where each NAME is read: rnnlab/cli/experiments.py).

A NAME is a DVC experiment (its git ref `refs/exps/.../<name>`: params.yaml and evaluate's metrics
as that experiment committed them), `workspace` (the files on disk), or an MLflow run id (32 hex
digits: its params and metrics in the tracking store, with those of the evaluation linked to it
by the tag `rnnlab.train_run_id`, when evaluate recorded a run of its own). No NAME: the
workspace and every DVC experiment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rnnlab.cli.experiments import (
    RUN_ID,
    WORKSPACE,
    experiment_refs,
    find_run,
    git_show,
    source_rows,
    workspace_file,
)
from rnnlab.errors import UserError
from rnnlab.tracking.table import RESULT_KEYS, SECTIONS, by_test_ppl, comparison

SERIES = ("train_ppl", "val_ppl", "tokens_per_sec")  # per epoch in MLflow: `summary.<name>` sums up
COUNTS = ("best_epoch", "epochs", "uniform_ppl")  # MLflow keeps every metric as a float
# = train.*, or derived: not settings of their own
NOT_SETTINGS = ("model.hidden_size", "model.dropout", "model.vocab_size", "model.parameters")


# --- MLflow runs ----------------------------------------------------------------------------------


def run_rows(run_id: str) -> list[dict]:
    """The row of one MLflow run: its params and metrics, with those of the newest evaluation
    linked to it (tag rnnlab.train_run_id) when evaluate recorded a run of its own."""
    client, run = find_run(run_id)
    runs = [run]
    if "test_ppl" not in run.data.metrics:  # a training run whose evaluation has a run of its own
        runs += client.search_runs([run.info.experiment_id],
                                   f"tags.`rnnlab.train_run_id` = '{run_id}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
    metrics, params = {}, {}
    for r in runs:
        metrics.update(r.data.metrics)
        params.update(r.data.params)
    results = {k: metrics.get(f"summary.{k}" if k in SERIES else k) for k in RESULT_KEYS}
    results.update({k: int(results[k]) for k in COUNTS if results[k] is not None})
    exp = run.data.tags.get("rnnlab.dvc_exp")
    settings = run_settings(params)
    return [{**results, "evaluated": "test_ppl" in metrics, "settings": settings,
             "source": f"run {run_id[:8]}" + (f" ({exp})" if exp else ""),
             "variant": params.get("variant") or run.data.tags.get("rnnlab.variant")}]


def run_settings(params: dict[str, str]) -> dict[str, str]:
    """A run's MLflow params as table settings: the sections of params.yaml, less `variant` and
    what repeats train.* or is derived (model.hidden_size, model.vocab_size, ...)."""
    return {k: v for k, v in params.items()
            if k.split(".")[0] in SECTIONS and k not in NOT_SETTINGS}


# --- the command ----------------------------------------------------------------------------------


def gather(names: list[str], params_path: str = "params.yaml",
           metrics_dir: str = "metrics/variants") -> list[dict]:
    """The rows of each NAME (no NAME: the workspace, when it has results, and every experiment).
    An unknown NAME, or nothing to compare, is a UserError."""
    refs = experiment_refs()
    if not names:
        rows = (source_rows(WORKSPACE, workspace_file, params_path, metrics_dir)
                if Path(params_path).is_file() else [])
        for name, ref in refs.items():
            try:
                rows += source_rows(name, lambda p, ref=ref: git_show(ref, p), params_path,
                                    metrics_dir)
            except UserError as err:  # e.g. params of an older schema: the others still show
                print(f"compare: left out experiment {str(err).splitlines()[0]}", file=sys.stderr)
        rows = [r for r in rows if r["evaluated"]]  # variants an experiment did not run
        if not rows:
            raise UserError("nothing to compare yet: no results in the workspace (dvc repro) and "
                            "no DVC experiments (dvc exp run)")
        return rows
    rows = []
    for name in dict.fromkeys(names):
        if name == WORKSPACE:
            rows += source_rows(WORKSPACE, workspace_file, params_path, metrics_dir)
        elif name in refs:
            rows += source_rows(name, lambda p, ref=refs[name]: git_show(ref, p), params_path,
                                metrics_dir)
        elif RUN_ID.fullmatch(name):
            rows += run_rows(name.lower())
        else:
            raise UserError(f"no experiment or run {name!r}; DVC experiments: "
                            f"{', '.join(refs) or 'none'}; also `{WORKSPACE}` (the files on disk), "
                            "or an MLflow run id (32 hex digits)")
    return rows


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="a table of the results of experiments or runs, and their "
                       "differing settings",
                       description="One table of the results of DVC experiments, the workspace "
                       "and MLflow runs, one row per variant, best test perplexity first, with a "
                       "column for each setting that differs among the rows.",
                       epilog="Example: rnnlab compare workspace book-gru --format csv")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"a DVC experiment, `{WORKSPACE}`, or an MLflow run id; none: the "
                        "workspace and every experiment")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown",
                   help="default: markdown")
    p.add_argument("--params", default="params.yaml",
                   help="the params file, in the workspace and in each experiment")
    p.add_argument("--metrics", default="metrics/variants",
                   help="evaluate's folder of <variant>.json (dvc.yaml)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    rows = sorted(gather(args.names, args.params, args.metrics), key=by_test_ppl)
    print(comparison(rows, fmt=args.format), end="")
