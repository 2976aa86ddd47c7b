"""Concurrent trainings tracking to the team server and to the local SQLite store.

    python -m bench.team_load                   # 8 writers and 1, server and SQLite
    python -m bench.team_load --writers 4 --epochs 40 --spin   # trainings that burn CPU

Each writer, a forked process, runs a synthetic training through rnnlab.tracking.tracked_run (the
train stage's params and tags, a log_metrics per epoch, the summary); all start together, against
a throwaway team stack (deploy/throwaway.py) as its member user, then SQLite in a fresh folder.
Measured per pass: wall time, REST calls, per-epoch latency, tracking's share. Every run is read
back from the store (missing or wrong: lost, exit 1). Writes metrics/bench/team-load-<cpu-kind>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import multiprocessing as mp
import os
import re
import shlex
import sys
import tempfile
import threading
import time
import traceback
from contextlib import ExitStack, redirect_stdout
from pathlib import Path

from bench.lib import ROOT  # noqa: E402
from bench.lib.team_load_check import (  # noqa: E402
    environment,
    epoch_metrics,
    metric_keys,
    run_record,
    summary_metrics,
    verify,
)
from bench.lib.team_load_report import figures, machine, markdown, print_row  # noqa: E402

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN", "DVC_ROOT")
# one line of uvicorn's access log: 127.0.0.1:57840 - "POST /api/2.0/mlflow/runs/log-batch HTTP/1.1" 200 OK
ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')
START_TIMEOUT = 300   # seconds for the writers to reach the start line
RUN_TIMEOUT = 900     # seconds for a pass's writers to finish


# --- one writer (a process of its own) ------------------------------------------------------------


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
        from rnnlab.tracking.runs import tracked_run

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


# --- a pass: N writers against one store ----------------------------------------------------------


def setup_run(job: dict) -> None:
    """One empty run, here: creates the store (SQLite) and the experiment, as an earlier
    training would have, so the timed writers find both."""
    from rnnlab.config import Tracking
    from rnnlab.tracking.runs import tracked_run

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


# --- main -----------------------------------------------------------------------------------------


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
                        help="the report (default metrics/bench/team-load-<cpu-kind>.md)")
    args = parser.parse_args(argv)
    if args.writers < 1 or args.epochs < 1 or args.metrics_per_epoch < 1:
        parser.error("--writers, --epochs and --metrics-per-epoch must be at least 1")
    if args.train_seconds_per_epoch < 0:
        parser.error("--train-seconds-per-epoch must be 0 or more")
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from rnnlab.tracking.store import STORE_FILE
    from bench.lib.machine import kind
    from deploy.throwaway import team_stack

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
    out = args.out or ROOT / "metrics" / "bench" / f"team-load-{kind()}.md"
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
