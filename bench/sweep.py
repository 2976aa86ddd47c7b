"""The same queued experiments run one after another and with parallel workers.

    python -m bench.sweep                       # 4 values of train.lr, rnn and lstm, -j 1 vs -j 2
    python -m bench.sweep --jobs 1 2 --dask 2 --variants rnn   # and `rnnlab sweep --local 2`

Each mode runs in its own fresh clone of the committed code (its own DVC cache) with
`train.threads: auto`: `dvc repro tokenize`, `dvc exp run --queue -S train.lr=...`, then
`dvc exp run --run-all -j N`. Measured: the queue's wall time and each training's tokens/s; the
aggregate rate is every training token over the wall time. Writes metrics/bench/sweep-<cpu-kind>.md
and .json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.lib import ROOT
from bench.lib.machine import kind
from rnnlab.training.threads import usable_cpus

# dvc.yaml's commands run `python`: this one's, as `make` arranges with PATH
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
for key in [k for k in ENV if k.startswith("DVC_") and k != "DVC_NO_ANALYTICS"] + ["MLFLOW_TRACKING_URI"]:
    ENV.pop(key, None)


def sh(*cmd: str, cwd: Path, log: Path | None = None) -> str:
    """Run `cmd`; its output goes through a file, not a pipe: the queue's daemon workers could
    inherit a pipe and keep this waiting until they exit."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(cmd, cwd=cwd, env=ENV, stdout=out, stderr=err,
                              stdin=subprocess.DEVNULL, text=True)
        stdout, stderr = (f.seek(0) or f.read() for f in (out, err))
    if log:
        log.write_text(stdout + stderr)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {proc.returncode}):\n{stderr[-3000:]}")
    return stdout


def clone(dest: Path, variants: list[str], epochs: int | None) -> Path:
    """A fresh clone of the committed code, the sweep's variants only, threads auto."""
    sh("git", "clone", "-q", str(ROOT), str(dest), cwd=ROOT)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    unknown = sorted(set(variants) - set(params["variants"]))
    if unknown:
        raise SystemExit(f"--variants: {', '.join(unknown)} not in params.yaml ({', '.join(params['variants'])})")
    params["variants"] = {v: params["variants"][v] for v in variants}
    params["train"]["threads"] = "auto"
    if epochs:
        params["train"]["epochs"] = epochs
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    sh("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qam", "sweep", cwd=dest)
    return dest


def run_sweep(repo: Path, jobs: int, values: list[str], dvc: str) -> dict:
    sh(dvc, "repro", "tokenize", cwd=repo)
    sh(dvc, "exp", "run", "--queue", "-S", f"train.lr={','.join(values)}", cwd=repo)
    start = time.perf_counter()
    sh(dvc, "exp", "run", "--run-all", "-j", str(jobs), cwd=repo, log=repo.parent / f"queue-j{jobs}.log")
    seconds = time.perf_counter() - start
    status = sh(dvc, "queue", "status", cwd=repo)
    trainings = trainings_of(repo, dvc)
    tokens = sum(t["tokens_per_sec"] * t["train_seconds"] for t in trainings)  # every training token
    return {"jobs": jobs, "seconds": seconds, "succeeded": status.count("Success"),
            "aggregate_tokens_per_sec": tokens / seconds, "trainings": trainings}


def run_dask(repo: Path, workers: int, values: list[str], dvc: str) -> dict:
    """`rnnlab sweep --local N` on the same experiments: wall time, and each experiment's steps
    (clone, pull, run, push) as the sweep reports them."""
    sh(dvc, "repro", "tokenize", cwd=repo)
    sh("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qam",
       "shared inputs", cwd=repo)
    start = time.perf_counter()
    out = sh(sys.executable, "-m", "rnnlab.cli.main", "sweep", "--local", str(workers), "--cpus", "1",
             "-S", f"train.lr={','.join(values)}", "--name", "bench", cwd=repo,
             log=repo.parent / f"dask-{workers}.log")
    seconds = time.perf_counter() - start
    steps = [dict((k, float(v)) for k, v in re.findall(r"(\w+) (\d+)s", found))
             for found in re.findall(r"^  bench-\w+ on .*\[(.*)\]$", out, re.M)]
    trainings = trainings_of(repo, dvc)
    tokens = sum(t["tokens_per_sec"] * t["train_seconds"] for t in trainings)
    return {"jobs": f"dask {workers}", "seconds": seconds, "succeeded": len(steps), "steps": steps,
            "aggregate_tokens_per_sec": tokens / seconds, "trainings": trainings}


def trainings_of(repo: Path, dvc: str) -> list[dict]:
    trainings = []
    for baseline in json.loads(sh(dvc, "exp", "show", "--json", cwd=repo)):
        for exp in baseline.get("experiments") or []:
            data = exp["revs"][0]["data"]
            for path, m in data["metrics"].items():
                if path.startswith("metrics/variants/"):
                    trainings.append({"experiment": exp["revs"][0]["name"], "variant": Path(path).stem,
                                      "lr": data["params"]["params.yaml"]["data"]["train"]["lr"], **m["data"]})
    return trainings


def mean_rate(result: dict, variant: str) -> float:
    rates = [t["tokens_per_sec"] for t in result["trainings"] if t["variant"] == variant]
    return sum(rates) / len(rates) if rates else float("nan")


def markdown(report: dict) -> str:
    m, runs = report["machine"], report["runs"]
    base = runs[0]
    lines = [f"# Sweep benchmark: {report['experiments']} experiments x {len(report['variants'])} variants",
             "", f"{m['cpu']}, {m['cpus']} usable CPUs; commit {m['commit']}; {report['date']}; "
             f"`train.lr` in {', '.join(report['values'])}; variants {', '.join(report['variants'])}; "
             f"{report['epochs']} epochs; `train.threads: auto`.", "",
             "| workers (-j) | succeeded | wall time | vs -j " + str(base["jobs"]) + " | aggregate training tok/s | "
             + " | ".join(f"{v} tok/s per training" for v in report["variants"]) + " |",
             "|---:|---:|---:|---:|---:|" + "---:|" * len(report["variants"])]
    for r in runs:
        lines.append(f"| {r['jobs']} | {r['succeeded']}/{report['experiments']} | {r['seconds']:.0f} s | "
                     f"{r['seconds'] / base['seconds']:.2f}x | {r['aggregate_tokens_per_sec']:,.0f} | "
                     + " | ".join(f"{mean_rate(r, v):,.0f}" for v in report["variants"]) + " |")
    for r in runs:
        if r.get("steps"):
            train = [t["train_seconds"] for t in r["trainings"]]
            over = [s.get("clone", 0) + s.get("pull", 0) + s.get("push", 0) for s in r["steps"]]
            run = [s.get("run", 0) for s in r["steps"]]
            lines += ["", f"{r['jobs']}: per experiment, clone + pull + push {sum(over) / len(over):.1f} s "
                      f"(of `dvc exp run` {sum(run) / len(run):.1f} s, the training itself "
                      f"{sum(train) / len(train):.1f} s): {sum(over) / max(sum(train), 1e-9):.0%} of the "
                      "training time"]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cpus": usable_cpus(), "host": socket.gethostname(), "commit": commit,
            "kind": kind(), "load_before": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="*", type=int, default=[1, 2],
                        help="queue workers to compare; the first is the baseline (default: 1 2)")
    parser.add_argument("--values", nargs="+", default=["0.001", "0.002", "0.005", "0.01"],
                        help="the swept values of train.lr (one experiment each)")
    parser.add_argument("--dask", nargs="*", type=int, default=[],
                        help="also `rnnlab sweep --local N` for each N (1 thread per experiment)")
    parser.add_argument("--variants", nargs="+", default=["rnn", "lstm"])
    parser.add_argument("--epochs", type=int, default=None, help="default: params.yaml's train.epochs")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench")
    args = parser.parse_args()

    dvc = str(Path(sys.executable).parent / "dvc")
    report = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
              "values": args.values, "variants": args.variants, "experiments": len(args.values), "runs": []}
    with tempfile.TemporaryDirectory(prefix="rnnlab-sweep-") as tmp:
        for jobs in args.jobs:
            repo = clone(Path(tmp) / f"j{jobs}" / "repo", args.variants, args.epochs)
            report["epochs"] = yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"]
            print(f"-j {jobs}: {len(args.values)} experiments x {len(args.variants)} variants ...", flush=True)
            result = run_sweep(repo, jobs, args.values, dvc)
            print(f"-j {jobs}: {result['succeeded']}/{len(args.values)} succeeded in {result['seconds']:.0f} s, "
                  f"{result['aggregate_tokens_per_sec']:,.0f} training tok/s in all", flush=True)
            report["runs"].append(result)
        for workers in args.dask:
            repo = clone(Path(tmp) / f"dask{workers}" / "repo", args.variants, args.epochs)
            report["epochs"] = yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"]
            print(f"rnnlab sweep --local {workers}: {len(args.values)} experiments ...", flush=True)
            result = run_dask(repo, workers, args.values, dvc)
            print(f"dask {workers}: {result['succeeded']}/{len(args.values)} in {result['seconds']:.0f} s; "
                  f"steps per experiment: {result['steps']}", flush=True)
            report["runs"].append(result)
    table = markdown(report)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"sweep-{report['machine']['kind']}"
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out / (stem + '.md')}")


if __name__ == "__main__":
    main()
