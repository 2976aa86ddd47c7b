"""`rnnlab compare [NAME ...]`: one table of the results of DVC experiments, the workspace and
MLflow runs, with a column for each setting that differs among them (the table: rnnlab/tracking/table.py).

A NAME is a DVC experiment (its git ref `refs/exps/.../<name>`: params.yaml and evaluate's metrics
as that experiment committed them), `workspace` (the files on disk), or an MLflow run id (32 hex
digits: its params and metrics in the tracking store, with those of the evaluation linked to it
by the tag `rnnlab.train_run_id`, when evaluate recorded a run of its own). No NAME: the
workspace and every DVC experiment.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml

from rnnlab.config import (  # _Loader: params.yaml's YAML 1.2 floats
    _Loader,
    deep_merge,
    validate_params,
)
from rnnlab.errors import UserError
from rnnlab.tracking.table import RESULT_KEYS, SECTIONS, by_test_ppl, comparison, row

WORKSPACE = "workspace"
EXPERIMENT_REF = re.compile(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/([^/]+)")  # DVC's refs of experiments
RUN_ID = re.compile(r"[0-9a-fA-F]{32}")
SERIES = ("train_ppl", "val_ppl", "tokens_per_sec")  # per-epoch in MLflow: the summary is `summary.<name>`
COUNTS = ("best_epoch", "epochs", "uniform_ppl")  # MLflow keeps every metric as a float
NOT_SETTINGS = ("model.hidden_size", "model.dropout", "model.vocab_size", "model.parameters")  # = train.*, or derived


# --- DVC experiments and the workspace -----------------------------------------------------------


def experiment_refs() -> dict[str, str]:
    """Each DVC experiment's name and git ref, newest first (a name made on several baselines:
    its newest). None outside a git repository."""
    try:
        out = subprocess.run(["git", "for-each-ref", "--sort=-creatordate", "--format=%(refname)", "refs/exps"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    refs: dict[str, str] = {}
    for ref in out.split():
        found = EXPERIMENT_REF.fullmatch(ref)
        if found:
            refs.setdefault(found.group(1), ref)
    return refs


def experiment_ref(name: str) -> str | None:
    """The newest git ref of the DVC experiment `name`, if there is one."""
    return experiment_refs().get(name)


def git_show(ref: str, path: str | Path) -> str | None:
    """A file as commit `ref` holds it (path relative to the working directory); None if it has none."""
    proc = subprocess.run(["git", "show", f"{ref}:./{Path(path).as_posix()}"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def workspace_file(path: str | Path) -> str | None:
    path = Path(path)
    return path.read_text(encoding="utf-8") if path.is_file() else None


def source_rows(label: str, read: Callable[[str], str | None], params_path: str, metrics_dir: str) -> list[dict]:
    """The rows of the workspace or one experiment: each variant of its params.yaml, with the
    metrics evaluate wrote for it (none where it has not run). `read(path)` gives a file's text."""
    text = read(params_path)
    if text is None:
        raise UserError(f"{label}: no {params_path}")
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise UserError(f"{label}: {params_path} is not valid YAML: {str(err).splitlines()[0]}") from None
    params = validate_params(with_later_keys(raw, params_path), f"{label}: {params_path}")
    rows = []
    for variant in params.variants:
        path = f"{Path(metrics_dir).as_posix()}/{variant}.json"
        metrics = read(path)
        try:
            results = json.loads(metrics) if metrics is not None else {}
        except json.JSONDecodeError as err:
            raise UserError(f"{label}: {path} is not valid JSON ({err})") from None
        rows.append(row(label, variant, results, params))
    return rows


def with_later_keys(raw: object, params_path: str) -> object:
    """An experiment's params.yaml with the keys added to params.yaml since it ran (a new setting,
    say tracking.register) taken from the workspace's, so that old experiments still compare; its
    own values and variants are kept."""
    if not isinstance(raw, dict) or not Path(params_path).is_file():
        return raw
    current = yaml.load(Path(params_path).read_text(encoding="utf-8"), Loader=_Loader)
    if not isinstance(current, dict):
        return raw
    return deep_merge({k: v for k, v in current.items() if k != "variants"}, raw)


# --- MLflow runs ----------------------------------------------------------------------------------


def find_run(run_id: str):
    """(an MlflowClient of the tracking store, the run `run_id` in it); a UserError naming the
    store if it has no such run. A SQLite store that does not exist is not created."""
    from rnnlab.redact import public_uri
    from rnnlab.tracking.store import tracking_uri  # first: it turns MLflow's telemetry off

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow run {run_id}: there is no tracking store at {public_uri(uri)} "
                        "(set MLFLOW_TRACKING_URI to the one that holds it)")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    try:
        return client, client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no MLflow run {run_id} at {public_uri(uri)} (MLFLOW_TRACKING_URI)") from None


def run_rows(run_id: str) -> list[dict]:
    """The row of one MLflow run: its params and metrics, with those of the newest evaluation
    linked to it (tag rnnlab.train_run_id) when evaluate recorded a run of its own."""
    client, run = find_run(run_id)
    runs = [run]
    if "test_ppl" not in run.data.metrics:  # a training run whose evaluation has a run of its own
        runs += client.search_runs([run.info.experiment_id], f"tags.`rnnlab.train_run_id` = '{run_id}'",
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
    return {k: v for k, v in params.items() if k.split(".")[0] in SECTIONS and k not in NOT_SETTINGS}


# --- the command ----------------------------------------------------------------------------------


def gather(names: list[str], params_path: str = "params.yaml", metrics_dir: str = "metrics/variants") -> list[dict]:
    """The rows of each NAME (no NAME: the workspace, when it has results, and every experiment)."""
    refs = experiment_refs()
    if not names:
        rows = source_rows(WORKSPACE, workspace_file, params_path, metrics_dir) if Path(params_path).is_file() else []
        for name, ref in refs.items():
            try:
                rows += source_rows(name, lambda p, ref=ref: git_show(ref, p), params_path, metrics_dir)
            except UserError as err:  # e.g. params of an older schema: the others still show
                print(f"compare: left out experiment {str(err).splitlines()[0]}", file=sys.stderr)
        rows = [r for r in rows if r["evaluated"]]  # variants an experiment did not run
        if not rows:
            raise UserError("nothing to compare yet: no results in the workspace (dvc repro) and no DVC "
                            "experiments (dvc exp run)")
        return rows
    rows = []
    for name in dict.fromkeys(names):
        if name == WORKSPACE:
            rows += source_rows(WORKSPACE, workspace_file, params_path, metrics_dir)
        elif name in refs:
            rows += source_rows(name, lambda p, ref=refs[name]: git_show(ref, p), params_path, metrics_dir)
        elif RUN_ID.fullmatch(name):
            rows += run_rows(name.lower())
        else:
            raise UserError(f"no experiment or run {name!r}; DVC experiments: {', '.join(refs) or 'none'}; "
                            f"also `{WORKSPACE}` (the files on disk), or an MLflow run id (32 hex digits)")
    return rows


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="a table of the results of experiments or runs, and their differing settings",
                       description="One table of the results of DVC experiments, the workspace and MLflow "
                       "runs, one row per variant, best test perplexity first, with a column for each "
                       "setting that differs among the rows.", epilog="Example: rnnlab compare workspace "
                       "book-gru --format csv")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"a DVC experiment, `{WORKSPACE}`, or an MLflow run id; none: the workspace and "
                        "every experiment")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="default: markdown")
    p.add_argument("--params", default="params.yaml", help="the params file, in the workspace and in each experiment")
    p.add_argument("--metrics", default="metrics/variants", help="evaluate's folder of <variant>.json (dvc.yaml)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    rows = sorted(gather(args.names, args.params, args.metrics), key=by_test_ppl)
    print(comparison(rows, fmt=args.format), end="")
