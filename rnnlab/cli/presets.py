"""Named presets: small overlays of params.yaml that reproduce the book's experiments.

A preset file (presets/<name>.yaml) holds only the settings that differ from params.yaml, and
its `variants` replace params.yaml's. `python -m rnnlab.cli.presets NAME` (or `make preset NAME=...`)
runs it as the DVC experiment NAME in a temporary copy of the workspace
(`dvc exp run --temp -n NAME -S ...`), so it shows up in `dvc exp show` and in MLflow under its
name, and the user's params.yaml is never touched.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

from rnnlab.cli.experiments import experiment_ref, git_show, source_rows
from rnnlab.config import deep_merge, read_yaml, validate_params
from rnnlab.errors import UserError, run_main
from rnnlab.tracking.table import VARIANT, Column, comparison, row

PRESETS = Path("presets")
_RESERVED = {"true", "false", "null", "nan", "inf"}  # bare words Hydra reads as non-strings
METRICS, CURVES, SAMPLES = "metrics/variants", "metrics/curves", "metrics/samples"  # as dvc.yaml writes them


def available(folder: Path = PRESETS) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_preset(name: str, folder: Path = PRESETS) -> dict:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"no preset {name!r} in {folder}/; available: {', '.join(available(folder))}")
    overlay = read_yaml(path)
    if not isinstance(overlay, dict):
        raise UserError(f"{path}: a preset is a mapping of params.yaml sections")
    return overlay


def merged(base: dict, overlay: dict) -> dict:
    """params.yaml with the preset on top; the preset's variants replace the base's."""
    out = deep_merge(base, {k: v for k, v in overlay.items() if k != "variants"})
    if "variants" in overlay:
        out["variants"] = overlay["variants"]
    return out


def overrides(overlay: dict) -> list[str]:
    """The preset as `dvc exp run -S` (Hydra) overrides: one per setting, variants replaced whole."""
    out = [f"{key}={hydra_value(value)}" for key, value in _leaves(
        {k: v for k, v in overlay.items() if k != "variants"})]
    if "variants" in overlay:
        out += ["~variants", f"+variants={hydra_value(overlay['variants'])}"]
    return out


def _leaves(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in d.items():
        path = f"{prefix}{key}"
        items += _leaves(value, path + ".") if isinstance(value, dict) and value else [(path, value)]
    return items


def hydra_value(v: Any) -> str:
    """A value in Hydra's override grammar: quoted strings, {k:v} dicts, [a,b] lists."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", v) and v.lower() not in _RESERVED:
            return v
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, list):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as a Hydra override")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Run a preset (presets/NAME.yaml) as the DVC experiment NAME.",
        epilog="Extra arguments go to `dvc exp run`, e.g. -S data.source=/path/to/copy.zip",
    )
    parser.add_argument("name", nargs="?", help="preset name; omit to list them")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command, run nothing")
    parser.add_argument("--results", action="store_true",
                        help="print a table of the runs of every preset (or of NAME)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="of --results")
    args, extra = parser.parse_known_args()
    if args.results:
        print(results_table([args.name] if args.name else available(), args.params, args.format), end="")
        return
    if not args.name:
        print("presets:", ", ".join(available()))
        return
    overlay = load_preset(args.name)
    validate_params(merged(read_yaml(args.params), overlay), f"presets/{args.name}.yaml")
    cmd = ["dvc", "exp", "run", "--temp", "-n", args.name]
    for o in overrides(overlay):
        cmd += ["-S", o]
    cmd += extra
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
        raise SystemExit(subprocess.run(cmd).returncode)


# --- results of preset runs, read back from their DVC experiment refs ----------------------------


def published_figure(name: str, folder: Path = PRESETS) -> str:
    """The book's figure, from the preset file's header comment (`Published: ...`)."""
    header = " ".join(line.lstrip("# ").strip() for line in (folder / f"{name}.yaml").read_text(
        encoding="utf-8").splitlines() if line.startswith("#"))
    found = re.search(r"Published: (.+?)\.(\s|$)", header)
    return found.group(1) if found else "?"


def results_rows(name: str, params_path: str = "params.yaml", folder: Path = PRESETS) -> list[dict]:
    """Table rows (rnnlab/tracking/table.py) of one preset's newest run, per variant, with the book's figure,
    the last epoch's perplexities and the greedy sample; a preset not run yet has rows with its
    settings and no results."""
    ref = experiment_ref(name)
    if ref is None:
        params = validate_params(merged(read_yaml(params_path), load_preset(name, folder)), f"presets/{name}.yaml")
        rows = [row(name, variant, {}, params) for variant in params.variants]
    else:
        rows = source_rows(name, lambda path: git_show(ref, path), params_path, METRICS)
    for r in rows:
        r["book"] = published_figure(name, folder)
        curves = git_show(ref, f"{CURVES}/{r['variant']}.csv") if ref else None
        r["last_val_ppl"] = float(list(csv.DictReader(io.StringIO(curves)))[-1]["val_ppl"]) if curves else None
        samples = git_show(ref, f"{SAMPLES}/{r['variant']}.md") if ref else None
        greedy = re.search(r"- greedy: `(.*)`", samples or "")
        r["greedy"] = greedy.group(1) if greedy else None
    return rows


RESULT_COLUMNS = (
    Column("book", "book"),
    Column("final_train_ppl", "train ppl, last epoch", ".2f", number=True),
    Column("last_val_ppl", "val ppl, last epoch", ".1f", number=True),
    Column("greedy", "greedy sample", lambda r: f"`{r['greedy']}`" if r["greedy"] else
           "not run yet" if r["test_ppl"] is None else "-"),
)


def results_table(names: list[str], params_path: str = "params.yaml", fmt: str = "markdown",
                  folder: Path = PRESETS) -> str:
    """The comparison table of the presets' runs (in the order given), the book's figures beside."""
    rows = [r for n in names for r in results_rows(n, params_path, folder)]
    return comparison(rows, lead=(Column("source", "preset"), VARIANT), extra=RESULT_COLUMNS, fmt=fmt)


if __name__ == "__main__":
    run_main(main)
