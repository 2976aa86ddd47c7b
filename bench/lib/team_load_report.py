"""The team load benchmark's figures from its passes: latencies, request counts and tracking
shares, as a Markdown report and a line per pass."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
from collections import Counter

from bench.lib import ROOT


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def figures(result: dict) -> dict:
    """A pass's row: wall time, request rate, latencies, tracking share, losses."""
    rs = result["results"]
    wall = max(r["end"] for r in rs) - min(r["start"] for r in rs)
    client, seconds = Counter(), Counter()
    for r in rs:
        for call, (n, t) in r["calls"].items():
            client[call] += n
            seconds[call] += t
    rest = sum(client.values())
    epochs = [s for r in rs for s in r["epochs"]]
    shares = [(r["end"] - r["start"] - r["train"]) / (r["end"] - r["start"]) for r in rs]
    points = sum(len(r["epochs"]) for r in rs) * len(result["keys"]) + len(rs) * result["summary_keys"]
    return {
        "backend": result["backend"], "writers": result["writers"], "wall": wall,
        "rest_client": rest,
        "rest_server": len(result["server_log"]) if result["backend"] == "server" else None,
        "rest_per_sec": rest / wall if rest else None,
        "rest_errors": {k: n for k, n in client.items() if not k.endswith((" 200", " 201"))},
        "calls_by_endpoint": {k: (n, seconds[k] / n) for k, n in sorted(client.items())},
        "points_per_sec": points / wall,
        "epoch_mean": statistics.fmean(epochs), "epoch_p50": statistics.median(epochs),
        "epoch_p95": p95(epochs), "epoch_max": max(epochs),
        "open_mean": statistics.fmean(r["open"] for r in rs),
        "close_mean": statistics.fmean(r["close"] for r in rs),
        "share_mean": statistics.fmean(shares), "share_max": max(shares),
        "lost": result["lost"], "load": result["load"],
    }


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                if line.startswith("Model name")), "unknown CPU")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    import mlflow

    return {"cpu": cpu, "cpus": os.cpu_count(), "host": socket.gethostname(), "commit": commit,
            "dirty": dirty, "mlflow": mlflow.__version__, "python": sys.version.split()[0]}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.1f}"


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# Team tracking load: {s['writers']} concurrent writers, server vs SQLite",
        "",
        f"{m['cpu']}, {m['cpus']} CPUs; host {m['host']}, commit {m['commit']}"
        f"{' (dirty)' if m['dirty'] else ''}, MLflow {m['mlflow']}, Python {m['python']}; "
        f"{report['date']}. Load average {report['load_before']:.1f} before, "
        f"{report['load_after']:.1f} after"
        f"{' (other work was running on the machine)' if report['other_load'] else ''}.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Each writer: a run through `rnnlab.tracking.tracked_run` with the train stage's tags and "
        f"{s['params']} params, {s['epochs']} epochs of {s['train_seconds']:g} s "
        f"{'busy-loop' if s['spin'] else 'sleep'} \"training\", each followed by one "
        f"`log_metrics` of {len(s['keys'])} curve metrics ({', '.join(s['keys'])}), then "
        f"{s['summary_keys']} summary metrics. server: a fresh team stack (PostgreSQL, moto S3, "
        "`mlflow server --app-name basic-auth --workers 1`) as its member user; sqlite: "
        "MLFLOW_TRACKING_URI unset, `mlflow.db` in a fresh temporary folder, under its file lock.",
        "",
        "| backend | writers | wall time | REST calls (client / server log) | REST calls/s | "
        "metric values/s | epoch log_metrics mean / p50 / p95 / max (ms) | run open / close (ms, mean) "
        "| tracking share (mean / max writer) | lost | load avg after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in report["rows"]:
        server = f"{f['rest_client']} / {f['rest_server']}" if f["rest_server"] is not None else "-"
        rate = f"{f['rest_per_sec']:.1f}" if f["rest_per_sec"] else "-"
        lines.append(
            f"| {f['backend']} | {f['writers']} | {f['wall']:.1f} s | {server} | {rate} | "
            f"{f['points_per_sec']:.0f} | {ms(f['epoch_mean'])} / {ms(f['epoch_p50'])} / "
            f"{ms(f['epoch_p95'])} / {ms(f['epoch_max'])} | {ms(f['open_mean'])} / "
            f"{ms(f['close_mean'])} | {f['share_mean']:.1%} / {f['share_max']:.1%} | "
            f"{sum(f['lost'].values())} | {f['load']:.1f} |")
    lines += ["", "Tracking share: a writer's time in tracking (run open, params, every "
              "log_metrics, close) over its training plus tracking time. Lost: runs missing or not "
              "FINISHED, params or tags missing, metric points missing, extra or wrong, read back "
              "after the writers ended (every metric's history against the expected steps and "
              "values)."]
    for f in report["rows"]:
        if any(f["lost"].values()):
            lines.append(f"\nLOST ({f['backend']}, {f['writers']} writers): {f['lost']}")
        if f["rest_errors"]:
            lines.append(f"\nREST calls not answered 200 ({f['backend']}, {f['writers']} writers): "
                         f"{f['rest_errors']}")
    server_rows = [f for f in report["rows"] if f["backend"] == "server"]
    if server_rows:
        calls = sorted({k for f in server_rows for k in f["calls_by_endpoint"]})
        lines += ["", "REST calls of the server passes by endpoint, as the writers counted and timed "
                  "them (count, mean ms from send to answer):", "",
                  "| call | " + " | ".join(f"{f['writers']} writer(s)" for f in server_rows) + " |",
                  "|---|" + "---:|" * len(server_rows)]
        for k in calls:
            cells = [f"{f['calls_by_endpoint'][k][0]} x {ms(f['calls_by_endpoint'][k][1])}"
                     if k in f["calls_by_endpoint"] else "-" for f in server_rows]
            lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_row(f: dict) -> None:
    rest = (f"{f['rest_client']} REST calls ({f['rest_per_sec']:.1f}/s; server log "
            f"{f['rest_server']}), " if f["rest_server"] is not None else "")
    print(f"{f['backend']:>6} x {f['writers']}: {f['wall']:.1f} s, {rest}epoch log_metrics "
          f"{ms(f['epoch_mean'])} ms mean, {ms(f['epoch_p95'])} ms p95, tracking "
          f"{f['share_mean']:.1%} of a writer's time; lost {sum(f['lost'].values())}"
          f"{' ' + str(f['lost']) if any(f['lost'].values()) else ''}"
          f"{'; not 200: ' + str(f['rest_errors']) if f['rest_errors'] else ''}", flush=True)
