"""The team load benchmark: concurrent trainings tracking to the team server and to the local store.

    python -m bench.team_load                                   # 8 writers and 1, server and SQLite
    python -m bench.team_load --writers 4 --epochs 40 --train-seconds-per-epoch 1
    python -m bench.team_load --spin                            # trainings that burn CPU, not sleep

Each writer is a process running a synthetic training through our real tracking path,
rnnlab.tracking.tracked_run: the run opens with the train stage's tags, logs the train stage's
params (run_params of params.yaml's first variant), then every epoch "trains" for
--train-seconds-per-epoch (a sleep; --spin: a busy loop) and logs that epoch's curve metrics
(rnnlab.records.CURVE_FIELDS less `epoch`, the step) in one log_metrics call, as record_curves
does; at the end it logs the summary metrics, as record_summary does, and the run ends FINISHED.
The writers are forked from one process that imported MLflow, and start together.

Two backends, each with --writers concurrent writers and with one (the baseline):

    server  a fresh team stack (tests/teamstack.py: PostgreSQL, moto S3, `mlflow server
            --app-name basic-auth`) on free ports in a temporary folder, as its member user
    sqlite  MLFLOW_TRACKING_URI unset: the default store mlflow.db in a fresh temporary folder
            (DVC_ROOT and the working directory), under its file lock

Before each pass one run creates the store and the experiment, as an earlier training would.
Measured per pass: wall time (first writer's start to last writer's end); REST calls, counted in
every writer (requests' HTTPAdapter.send) and in the server's access log; per-epoch tracking
latency (one epoch's log_metrics); run open and close; the tracking share of each writer (time
in tracking / (training + tracking)). Then every run is read back from the backend store (the
server's PostgreSQL database itself, the SQLite file): FINISHED, every param and tag, and every
metric's history with exactly the expected steps and values; anything else is a loss.
Writes a Markdown report (--out). Not a test: nothing here asserts a speed; a loss exits 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import multiprocessing as mp
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from contextlib import ExitStack, contextmanager, redirect_stdout
from pathlib import Path
from typing import Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN", "DVC_ROOT")
# one line of uvicorn's access log: 127.0.0.1:57840 - "POST /api/2.0/mlflow/runs/log-batch HTTP/1.1" 200 OK
ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')
START_TIMEOUT = 300   # seconds for the writers to reach the start line
RUN_TIMEOUT = 900     # seconds for a pass's writers to finish


# --- what a writer logs (pure: the verification recomputes it) --------------------------------------


def metric_keys(n: int) -> list[str]:
    """The per-epoch metrics: the curve fields less `epoch` (the step), then `extra_<i>` if n is
    larger."""
    from rnnlab.records import CURVE_FIELDS

    curve = [k for k in CURVE_FIELDS if k != "epoch"]
    return curve[:n] + [f"extra_{i}" for i in range(1, n - len(curve) + 1)]


def epoch_metrics(keys: list[str], writer: int, epoch: int) -> dict[str, float]:
    """Epoch `epoch`'s values for writer `writer`: distinct per writer, epoch and key, six
    significant digits as record_curves rounds them."""
    return {k: float(f"{100.0 / epoch + writer + i / 8:.6g}") for i, k in enumerate(keys)}


def summary_metrics(writer: int, epochs: int, train_seconds: float) -> dict[str, float]:
    """The train stage's summary (stages/train.py), under its MLflow names (`summary.<key>` for a
    curve field), as record_summary logs it."""
    from rnnlab.records import mlflow_name

    summary = {"best_epoch": epochs, "best_val_ppl": 100.0 / max(epochs, 1) + writer,
               "final_train_ppl": 100.0 / max(epochs, 1) + writer, "epochs": epochs,
               "tokens_per_sec": 1e5 + writer, "train_seconds": train_seconds, "parameters": 12345}
    return {mlflow_name(k): float(f"{v:.6g}") for k, v in summary.items()}


def run_record() -> tuple[dict, dict]:
    """The params and tags stages/train.py gives a run of params.yaml's first variant."""
    from rnnlab.config import load_params, resolve_train
    from rnnlab.models import build_model, model_config
    from rnnlab.records import run_params
    from rnnlab.tracking import dvc_tags, git_tags

    params = load_params(ROOT / "params.yaml")
    variant = next(iter(params.variants))
    model = build_model(model_config(params.variants[variant], resolve_train(params, variant), 28))
    n_params = sum(p.numel() for p in model.parameters())
    tags = {**git_tags(), **dvc_tags(f"train@{variant}", ROOT / "params.yaml"),
            "rnnlab.variant": variant, "rnnlab.bench": "team_load"}
    return run_params(params, variant, model.config, n_params), tags


# --- one writer (a process of its own) --------------------------------------------------------------


def count_requests() -> dict[str, list]:
    """Count and time every HTTP request this process sends, as {"METHOD /path STATUS": [count,
    seconds]} (urllib3's retries inside one send aside): requests' HTTPAdapter sends them all,
    MLflow's TCPKeepAliveHTTPAdapter included."""
    from urllib.parse import urlsplit

    from requests.adapters import HTTPAdapter

    calls: dict[str, list] = {}
    send = HTTPAdapter.send

    def counted(self, request, *args, **kwargs):
        t0 = time.perf_counter()
        response = send(self, request, *args, **kwargs)
        seen = calls.setdefault(f"{request.method} {urlsplit(request.url).path} "
                                f"{response.status_code}", [0, 0.0])
        seen[0] += 1
        seen[1] += time.perf_counter() - t0
        return response

    HTTPAdapter.send = counted
    return calls


def train(seconds: float, spin: bool) -> float:
    """The synthetic epoch's training: sleep, or burn the CPU, for `seconds`; returns the time."""
    t0 = time.perf_counter()
    if spin:
        while time.perf_counter() - t0 < seconds:
            pass
    else:
        time.sleep(seconds)
    return time.perf_counter() - t0


def writer(index: int, job: dict, start, results) -> None:
    """One synthetic training: wait at `start` (a barrier), then a tracked run; its timings and
    request counts go to `results`, or the traceback if it fails."""
    try:
        os.environ.update(job["env"])
        for key in job["unset"]:
            os.environ.pop(key, None)
        os.chdir(job["cwd"])
        calls = count_requests()
        import mlflow  # noqa: F401  (imports are not tracking time)

        from rnnlab.config import Tracking
        from rnnlab.tracking import tracked_run

        cfg = Tracking(enabled=True, experiment=job["experiment"], patience=30, register=None)
        tags = {**job["tags"], "rnnlab.writer": index}
        epochs, training, latencies = job["epochs"], [], []
        start.wait(START_TIMEOUT)
        t_start = time.monotonic()
        with redirect_stdout(io.StringIO()):  # tracked_run's line per run
            with tracked_run(cfg, job["experiment"], f"writer-{index}", tags) as tracker:
                opened = time.monotonic() - t_start
                tracker.log_params(job["params"])
                for epoch in range(1, epochs + 1):
                    training.append(train(job["train_seconds"], job["spin"]))
                    t0 = time.perf_counter()
                    tracker.log_metrics(epoch_metrics(job["keys"], index, epoch), step=epoch)
                    latencies.append(time.perf_counter() - t0)
                tracker.log_metrics(summary_metrics(index, epochs, job["train_seconds"] * epochs))
                t_close = time.monotonic()
        t_end = time.monotonic()
        results.put({"index": index, "run_id": tracker.run_id, "start": t_start, "end": t_end,
                     "open": opened, "close": t_end - t_close, "epochs": latencies,
                     "train": sum(training), "calls": dict(calls)})
    except BaseException:
        results.put({"index": index, "error": traceback.format_exc()})
        raise


# --- a pass: N writers against one store ------------------------------------------------------------


@contextmanager
def environment(env: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    """os.environ with `env` set and `unset` removed, for the block (this process's MLflow)."""
    saved = {k: os.environ.get(k) for k in [*env, *unset]}
    os.environ.update(env)
    for key in unset:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def setup_run(job: dict) -> None:
    """One empty run, here: creates the store (SQLite) and the experiment, as an earlier
    training would have, so the timed writers find both."""
    from rnnlab.config import Tracking
    from rnnlab.tracking import tracked_run

    cwd = os.getcwd()
    os.chdir(job["cwd"])
    try:
        with environment(job["env"], job["unset"]), redirect_stdout(io.StringIO()):
            with tracked_run(Tracking(enabled=True, experiment=job["experiment"], patience=30, register=None),
                             job["experiment"], "setup", {"rnnlab.bench": "team_load setup"}):
                pass
    finally:
        os.chdir(cwd)


def access_lines(log: Path | None, offset: int) -> list[tuple[str, str, str]]:
    """(method, path, status) of each request the server logged after byte `offset`."""
    if log is None:
        return []
    with open(log, "rb") as f:
        f.seek(offset)
        return ACCESS.findall(f.read().decode(errors="replace"))


def run_pass(backend: str, writers: int, job: dict, log: Path | None) -> dict:
    """`writers` processes at once against `job`'s store; their results, ordered by index."""
    setup_run(job)
    # Forked from a forkserver process that imported MLflow once and made no store or session:
    # no MLflow state shared with this process, and not 8 imports of MLflow at each pass.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mlflow", "rnnlab.tracking"])
    start, results = ctx.Barrier(writers + 1), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(i, job, start, results), name=f"writer-{i}")
             for i in range(writers)]
    for p in procs:
        p.start()
    try:
        start.wait(START_TIMEOUT)
    except threading.BrokenBarrierError:
        pass  # a writer died before the start: its traceback is among the results below
    offset = log.stat().st_size if log else 0
    got = [results.get(timeout=RUN_TIMEOUT) for _ in procs]
    for p in procs:
        p.join(60)
    failed = [r["error"] for r in got if "error" in r]
    if failed:
        raise SystemExit(f"{backend}, {writers} writer(s): {len(failed)} writer(s) failed; the "
                         f"first:\n{failed[0]}")
    time.sleep(0.5)  # the server's last access-log lines
    return {"backend": backend, "writers": writers, "results": sorted(got, key=lambda r: r["index"]),
            "server_log": access_lines(log, offset)}


# --- the read-back ------------------------------------------------------------------------------------


def verify(result: dict, job: dict, store: str, store_env: dict[str, str]) -> dict:
    """Read every run back from the backend store `store` (for the server: its PostgreSQL
    database, not the REST API, whose every call costs a password check); count what is missing
    or wrong. Every count must be zero."""
    from mlflow import MlflowClient

    lost = Counter()
    cwd = os.getcwd()
    os.chdir(job["cwd"])
    try:
        with environment(store_env):
            client = MlflowClient(store)
            experiment = client.get_experiment_by_name(job["experiment"])
            runs = client.search_runs([experiment.experiment_id], max_results=1000)
            ids = {r["run_id"] for r in result["results"]}
            lost["runs missing"] += len(ids - {r.info.run_id for r in runs})
            lost["runs extra"] += sum(1 for r in runs if r.info.run_id not in ids
                                      and r.data.tags.get("rnnlab.bench") != "team_load setup")
            for r in result["results"]:
                run = client.get_run(r["run_id"])
                lost["runs not FINISHED"] += run.info.status != "FINISHED"
                want_params = {k: str("null" if v is None else v) for k, v in job["params"].items()}
                lost["params"] += sum(run.data.params.get(k) != v for k, v in want_params.items())
                want_tags = {**job["tags"], "rnnlab.writer": r["index"]}
                lost["tags"] += sum(run.data.tags.get(k) != str(v) for k, v in want_tags.items())
                expected = {k: {} for k in job["keys"]}
                for epoch in range(1, job["epochs"] + 1):
                    for k, v in epoch_metrics(job["keys"], r["index"], epoch).items():
                        expected[k][epoch] = v
                summary = summary_metrics(r["index"], job["epochs"],
                                          job["train_seconds"] * job["epochs"])
                for k, v in summary.items():
                    expected[k] = {0: v}  # no step: MLflow's step 0
                for key, points in expected.items():
                    history = client.get_metric_history(r["run_id"], key)
                    got = Counter((m.step, m.value) for m in history)
                    lost["metric points missing"] += sum(got[(s, v)] == 0 for s, v in points.items())
                    for (step, value), n in got.items():  # a wrong value, or a point twice
                        lost["metric points extra or wrong"] += n - 1 if points.get(step) == value else n
    finally:
        os.chdir(cwd)
    return {k: lost[k] for k in ("runs missing", "runs extra", "runs not FINISHED", "params", "tags",
                                 "metric points missing", "metric points extra or wrong")}


# --- figures and the report -------------------------------------------------------------------------


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


# --- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=8,
                        help="concurrent writers (default 8); a 1-writer pass runs as the baseline")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per writer (default 3)")
    parser.add_argument("--metrics-per-epoch", type=int, default=7,
                        help="metrics per log_metrics call; 7: the curve fields less epoch, more "
                             "adds extra_<i> (default 7)")
    parser.add_argument("--train-seconds-per-epoch", type=float, default=1.0,
                        help="simulated training between two epochs' tracking, seconds (default 1)")
    parser.add_argument("--spin", action="store_true",
                        help="train by burning the CPU instead of sleeping (trainings then compete "
                             "with the server for the CPUs)")
    parser.add_argument("--backends", nargs="+", choices=["server", "sqlite"],
                        default=["server", "sqlite"])
    parser.add_argument("--out", type=Path, default=None,
                        help="the report (default metrics/bench/<date>-team-load.md)")
    args = parser.parse_args(argv)
    if args.writers < 1 or args.epochs < 1 or args.metrics_per_epoch < 1:
        parser.error("--writers, --epochs and --metrics-per-epoch must be at least 1")
    if args.train_seconds_per_epoch < 0:
        parser.error("--train-seconds-per-epoch must be 0 or more")
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from rnnlab.tracking import STORE_FILE
    from tests.teamstack import team_stack

    params, tags = run_record()
    keys = metric_keys(args.metrics_per_epoch)
    summary_keys = len(summary_metrics(0, args.epochs, 0.0))
    counts = sorted({1, args.writers})
    load_before = os.getloadavg()[0]
    report = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
              "command": shlex.join(["python", "-m", "bench.team_load", *args.argv]),
              "load_before": load_before, "rows": [],
              "settings": {"writers": args.writers, "epochs": args.epochs, "keys": keys,
                           "summary_keys": summary_keys, "params": len(params),
                           "train_seconds": args.train_seconds_per_epoch, "spin": args.spin}}
    base = {"params": params, "tags": tags, "keys": keys, "epochs": args.epochs,
            "train_seconds": args.train_seconds_per_epoch, "spin": args.spin}
    with tempfile.TemporaryDirectory(prefix="rnnlab-team-load-", ignore_cleanup_errors=True) as tmp, \
            ExitStack() as stacks:
        tmp = Path(tmp)
        for backend in args.backends:
            if backend == "server":
                print("server: starting a team stack (PostgreSQL, S3, MLflow) ...", flush=True)
                team = stacks.enter_context(team_stack(tmp / "team", cwd=ROOT))
            for n in counts:
                if backend == "server":  # one stack, an experiment per pass
                    job = {"env": team.env, "unset": ("DVC_ROOT",), "cwd": str(ROOT)}
                    log = team.paths.log("mlflow")
                    store = team.stack.db_uri("mlflow")
                    store_env = {"PGPASSFILE": str(team.paths.pgpass)}  # libpq's password
                else:  # a fresh store per pass
                    folder = tmp / f"sqlite-{n}"
                    folder.mkdir()
                    job = {"env": {"DVC_ROOT": str(folder)}, "unset": TRACKING_ENV[:-1],
                           "cwd": str(folder)}
                    log, store, store_env = None, f"sqlite:///{folder / STORE_FILE}", {}
                job.update(base, experiment=f"team-load-{n}w")
                print(f"{backend} x {n}: {n} writer(s), {args.epochs} epochs each ...", flush=True)
                result = run_pass(backend, n, job, log)
                result.update(keys=keys, summary_keys=summary_keys, load=os.getloadavg()[0])
                result["lost"] = verify(result, job, store, store_env)
                row = figures(result)
                print_row(row)
                report["rows"].append(row)
            stacks.close()  # the server's stack stops before the SQLite passes
    report["load_after"] = os.getloadavg()[0]
    report["other_load"] = load_before >= 0.5
    out = args.out or ROOT / "metrics" / "bench" / f"{dt.date.today()}-team-load.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    out.write_text(text)
    print("\n" + text)
    print(f"report: {out}")
    lost = sum(sum(f["lost"].values()) for f in report["rows"])
    if lost:
        raise SystemExit(f"LOST {lost} records: see the table")


if __name__ == "__main__":
    main()
