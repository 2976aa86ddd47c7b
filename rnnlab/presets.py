"""Named presets: small overlays of params.yaml that reproduce the book's experiments.

A preset file (presets/<name>.yaml) holds only the settings that differ from params.yaml, and
its `variants` replace params.yaml's. `python -m rnnlab.presets NAME` (or `make preset NAME=...`)
runs it as the DVC experiment NAME in a temporary copy of the workspace
(`dvc exp run --temp -n NAME -S ...`), so it shows up in `dvc exp show` and in MLflow under its
name, and the user's params.yaml is never touched.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from rnnlab.config import deep_merge, read_yaml, validate_params
from rnnlab.errors import UserError, run_main

PRESETS = Path("presets")
_RESERVED = {"true", "false", "null", "nan", "inf"}  # bare words Hydra reads as non-strings


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
                        help="print a Markdown table of the runs of every preset (or of NAME)")
    args, extra = parser.parse_known_args()
    if args.results:
        print(results_table([args.name] if args.name else available()))
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


def experiment_ref(name: str) -> str | None:
    """The newest git ref of the DVC experiment `name` (refs/exps/.../<name>)."""
    refs = subprocess.run(["git", "for-each-ref", "--sort=-creatordate", "--format=%(refname)",
                           "refs/exps"], capture_output=True, text=True, check=True).stdout.split()
    return next((r for r in refs if r.rsplit("/", 1)[-1] == name), None)


def _git_show(ref: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True,
                          check=True).stdout


def results_rows(name: str) -> list[str]:
    """Markdown rows for one preset: the book's figure beside ours, per variant."""
    import csv
    import io
    import json

    ref = experiment_ref(name)
    if ref is None:
        return [f"| {name} | {published_figure(name)} | not run yet | | | | | |"]
    rows = []
    for variant in load_preset(name)["variants"]:
        m = json.loads(_git_show(ref, f"metrics/variants/{variant}.json"))
        curves = list(csv.DictReader(io.StringIO(_git_show(ref, f"metrics/curves/{variant}.csv"))))
        samples = _git_show(ref, f"metrics/samples/{variant}.md")
        greedy = re.search(r"- greedy: `(.*)`", samples).group(1)
        rows.append(
            f"| {name} ({variant}) | {published_figure(name)} | {m['final_train_ppl']:.2f} | "
            f"{float(curves[-1]['val_ppl']):.1f} | {m['val_ppl']:.2f} (epoch {m['best_epoch']}) | "
            f"{m['test_ppl']:.2f} | {m['tokens_per_sec']:,.0f} | `{greedy}` |")
    return rows


def results_table(names: list[str]) -> str:
    head = ("| preset (variant) | book | train ppl, last epoch | val ppl, last epoch | "
            "val ppl, best epoch | test ppl, best epoch | tokens/s | greedy sample |\n"
            "|---|---|---:|---:|---:|---:|---:|---|")
    return "\n".join([head, *(row for n in names for row in results_rows(n))])


if __name__ == "__main__":
    run_main(main)
