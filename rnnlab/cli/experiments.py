"""Where results live, read for the commands: DVC experiments, the workspace, MLflow runs.

`compare`, `generate` and `presets` name a result the same way: a DVC experiment (its git ref
`refs/exps/.../<name>`), `workspace` (the files on disk) or an MLflow run id (`RUN_ID`). This
module finds each and reads it: an experiment's files as its commit holds them (`git_show`), its
params and metrics as table rows (`source_rows`), a run in the tracking store (`find_run`).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Callable

import yaml

from rnnlab.config import deep_merge, parse_yaml, validate_params
from rnnlab.errors import UserError
from rnnlab.tracking.table import row

WORKSPACE = "workspace"
EXPERIMENT_REF = re.compile(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/([^/]+)")  # DVC's refs
RUN_ID = re.compile(r"[0-9a-fA-F]{32}")  # an MLflow run id


# --- DVC experiments and the workspace -----------------------------------------------------------


def experiment_refs() -> dict[str, str]:
    """Each DVC experiment's name and git ref, newest first (a name made on several baselines:
    its newest). None outside a git repository."""
    try:
        out = subprocess.run(["git", "for-each-ref", "--sort=-creatordate", "--format=%(refname)",
                              "refs/exps"], capture_output=True, text=True, check=True).stdout
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
    """A file as commit `ref` holds it (path relative to the working directory); None if it has
    none."""
    proc = subprocess.run(["git", "show", f"{ref}:./{Path(path).as_posix()}"],
                          capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def workspace_file(path: str | Path) -> str | None:
    """A file of the workspace, as `git_show` gives a commit's; None if there is none."""
    path = Path(path)
    return path.read_text(encoding="utf-8") if path.is_file() else None


def source_rows(label: str, read: Callable[[str], str | None], params_path: str,
                metrics_dir: str) -> list[dict]:
    """The rows of the workspace or one experiment: each variant of its params.yaml, with the
    metrics evaluate wrote for it (none where it has not run). `read(path)` gives a file's text.
    A missing or invalid params file or metrics file is a UserError naming `label`."""
    text = read(params_path)
    if text is None:
        raise UserError(f"{label}: no {params_path}")
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as err:
        raise UserError(f"{label}: {params_path} is not valid YAML: "
                        f"{str(err).splitlines()[0]}") from None
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
    current = parse_yaml(Path(params_path).read_text(encoding="utf-8"))
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
        raise UserError(f"no MLflow run {run_id} at {public_uri(uri)} "
                        "(MLFLOW_TRACKING_URI)") from None
