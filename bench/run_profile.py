"""Where the default run's wall time goes: `dvc repro` of a fresh clone, stage by stage.

    python -m bench.run_profile                 # a clone of HEAD, params.yaml as committed
    python -m bench.run_profile --set train.bf16=false   # one setting changed, as `-S` does

In a git clone of HEAD (tracking to its own SQLite store) with RNNLAB_PROFILE set, each stage
records where its time went (rnnlab/phases.py); the rest of the wall time is DVC's. Kernel choices
come from this machine's cache (`--fresh-cache`: measured anew). Writes
metrics/bench/run-profile-<cpu-kind>.md and .json (-set.* with --set): wall time over the sum of
the trainings' own `train_seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dvc.exceptions import DvcException
from dvc.utils.hydra import apply_overrides

from bench.lib import ROOT
from bench.lib.machine import machine
from rnnlab.phases import PHASES, PROFILE_ENV

COLUMNS = ("stage", *PHASES, "process", "dvc", "wall")


def profile(repo: Path, env: dict[str, str], log: Path) -> dict:
    """`dvc repro` in `repo` with the stages' profile written to `log`; -> the numbers."""
    env = {**env, PROFILE_ENV: str(log)}
    start_wall, start = time.time(), time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=repo, env=env,
                   check=True)
    wall = time.perf_counter() - start
    stages = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows, previous_end = [], start_wall
    for s in stages:  # dvc repro runs one stage at a time: DVC's share is the gap before each
        process = sum(s["seconds"].values())
        rows.append({"stage": s["stage"], **s["seconds"], "process": process,
                     "dvc": max(0.0, s["started"] - previous_end)})
        previous_end = s["ended"]
    trained = {p.parent.name: json.loads(p.read_text())
               for p in sorted((repo / "models").glob("*/train.json"))}
    evaluations = {p.stem: json.loads(p.read_text())
                   for p in sorted((repo / "metrics" / "variants").glob("*.json"))}
    best = min(evaluations.items(), key=lambda kv: kv[1]["test_ppl"])
    variants = {name: {"precision": t.get("precision", "float32"), "train_seconds": t["train_seconds"],
                       **{k: evaluations[name][k] for k in ("train_ppl", "val_ppl", "test_ppl")}}
                for name, t in trained.items()}
    return {"wall": wall, "tail_dvc": max(0.0, start_wall + wall - previous_end), "rows": rows,
            "variants": variants, "sum_train_seconds": sum(v["train_seconds"] for v in variants.values()),
            "best_test_ppl": {"variant": best[0], "test_ppl": best[1]["test_ppl"]}}


def markdown(result: dict) -> str:
    """The profile as a Markdown table: one row per stage, then the totals."""
    m = result["machine"]
    lines = [f"# Where `dvc repro` spends its time: {m['cpu']} ({m['kind']})", "",
             f"{result['date']}, `{result['command']}`, commit {m.get('commit', '?')}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" + "---:|" * (len(COLUMNS) - 1)]
    totals = dict.fromkeys(COLUMNS[1:], 0.0)
    for row in result["rows"]:
        lines.append("| " + " | ".join([row["stage"]] + [f"{row[c]:.1f}" for c in COLUMNS[1:-1]])
                     + " | |")
        for c in COLUMNS[1:-1]:
            totals[c] += row[c]
    totals["dvc"] += result["tail_dvc"]
    lines.append("| **all** | " + " | ".join(f"**{totals[c]:.1f}**" for c in COLUMNS[1:-1])
                 + f" | **{result['wall']:.1f}** |")
    s = result["sum_train_seconds"]
    lines += ["", f"Seconds. The trainings' own `train_seconds` add up to {s:.1f} s; the run's wall "
              f"time is **{result['wall'] / s:.2f}x** that. Best test perplexity: "
              f"{result['best_test_ppl']['test_ppl']:.3f} ({result['best_test_ppl']['variant']}).",
              "", "`dvc` is the wall time outside the stage processes (DVC's start-up, status, "
              "hashing, dvc.lock, each process's exit); `startup` a process's time before its "
              "main (the interpreter and the imports)."]
    if result.get("variants"):
        lines += ["", "| variant | precision | train_seconds | train ppl | val ppl | test ppl |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {v['precision']} | {v['train_seconds']:.1f} | {v['train_ppl']:.3f} | "
                  f"{v['val_ppl']:.3f} | {v['test_ppl']:.3f} |" for name, v in result["variants"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh-cache", action="store_true",
                        help="an empty kernel cache: every choice measured (the native build too)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one setting of the clone's params.yaml, as dvc exp run -S")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench")
    args = parser.parse_args()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("DVC_EXP_NAME", "MLFLOW_TRACKING_URI", PROFILE_ENV):
        env.pop(name, None)
    with tempfile.TemporaryDirectory(prefix="rnnlab-profile-") as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        if args.set:  # exactly as `dvc exp run -S` applies them
            try:
                apply_overrides(repo / "params.yaml", args.set)
            except DvcException as err:
                cause = f" ({err.__cause__})" if err.__cause__ else ""
                raise SystemExit(f"--set {' '.join(args.set)}: {err}{cause}") from None
        if args.fresh_cache:
            env["RNNLAB_CACHE_DIR"] = str(Path(tmp) / "cache")
        result = profile(repo, env, Path(tmp) / "profile.jsonl")
    info = machine()
    result.update(date=time.strftime("%Y-%m-%d %H:%M"), machine=info, settings=args.set,
                  command=" ".join(["python -m bench.run_profile", *sys.argv[1:]]))
    text = markdown(result)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"run-profile-{info['kind']}{'-set' if args.set else ''}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
