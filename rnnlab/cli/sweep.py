"""`rnnlab sweep`: a grid of DVC experiments on a Dask cluster (rnnlab/cluster/sweep.py,
docs/cluster.md). Needs the `cluster` extra (Dask)."""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rnnlab.errors import UserError

CONNECT_SECONDS = 15  # a scheduler that does not answer by then is an error


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="a grid of DVC experiments on a Dask cluster",
                       description="Run every combination of the -S settings as a DVC experiment "
                       "on a Dask cluster's workers, each in a clone of this commit, tracked to the "
                       "MLflow server and pushed to the git and DVC remotes; then pull them all "
                       "here. Running the same command again runs only what is missing.")
    add_cluster_args(p)
    p.add_argument("-S", "--set-param", dest="settings", action="append", default=[],
                   metavar="KEY=VALUES", help="as dvc exp run -S: train.lr=0.001,0.002, "
                   "'train.epochs=range(2,8,2)', 'train.optimizer=choice(sgd,adam)'; several -S: "
                   "their product")
    p.add_argument("--name", default="sweep", help="the experiments' name prefix (default: sweep)")
    p.set_defaults(run=run)


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler, e.g. "
                       "tcp://10.0.0.5:8786")
    where.add_argument("--local", type=int, metavar="N", help="N one-experiment workers on this "
                       "machine, its cores shared among them")
    p.add_argument("--remote", help="the git remote the workers clone from and push to (default: "
                   "the one the branch tracks)")
    p.add_argument("--cpus", type=int, help="cores per experiment, its train.threads (default: "
                   "1; with --local N, this machine's cores / N)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per experiment (> 0: train.device=cuda "
                   "on workers started with --resources gpus=K)")


def cores(args: argparse.Namespace) -> int:
    """Cores per experiment: --cpus; else with --local N this machine's cores / N; else 1."""
    return args.cpus or (max(1, (os.cpu_count() or 1) // args.local) if args.local else 1)


def run(args: argparse.Namespace) -> None:
    from rnnlab.cluster import sweep

    cpus = cores(args)
    if args.local is not None and args.local < 1:
        raise UserError(f"--local {args.local}: give at least one worker")
    repo = Path.cwd()
    p = sweep.plan(repo, args.settings, remote=args.remote, prefix=args.name, cpus=cpus,
                   gpus=args.gpus, local=args.local is not None)
    say_plan(p)
    if not p.jobs:
        print("sweep: nothing to run: every experiment is on the git remote already")
        sweep.pull(p, p.skipped)
        return
    print(f"sweep: {sweep.share_inputs(p)}", flush=True)
    start = time.monotonic()
    with cluster(args, cpus) as client:
        progress = sweep.run(p, client)
    names = [o.name for o in progress.done]
    sweep.pull(p, names + p.skipped)
    say_outcomes(progress.done, start)
    if progress.failed:
        raise UserError("\n".join([*progress.failed, f"{len(progress.failed)} of {progress.total} "
                                   "experiments failed; the others are here (dvc exp show); run the "
                                   "same command again to retry only those"]))


def say_plan(p) -> None:
    print(f"sweep: {len(p.jobs) + len(p.skipped)} experiment(s) of commit {p.base[:12]}"
          f"{f', {len(p.skipped)} already pushed (skipped)' if p.skipped else ''}", flush=True)
    for job in p.jobs:
        print(f"  {job.name}: {' '.join(job.settings) or '(the committed params)'}")


def say_outcomes(done, start: float) -> None:
    for o in sorted(done, key=lambda o: o.name):
        best = ", ".join(f"{v} val {m.get('val_ppl')}" for v, m in o.metrics.items())
        steps = " ".join(f"{k} {abs(s):.0f}s" for k, s in o.seconds.items())
        print(f"  {o.name} on {o.where}: {best}  [{steps}]")
    print(f"sweep: done in {time.monotonic() - start:.0f} s; `dvc exp show` compares them here")


@contextmanager
def cluster(args: argparse.Namespace, cpus: int) -> Iterator[object]:
    """A Dask client: of the scheduler named, or of a local cluster of --local workers. Losing the
    scheduler is one error line."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserError("rnnlab sweep needs Dask: pip install -e '.[cluster]' (make setup "
                        "installs it)") from None
    address = args.scheduler
    try:
        if args.local:
            with LocalCluster(n_workers=args.local, threads_per_worker=1, processes=True,
                              resources={"cpus": cpus}, dashboard_address=None,
                              silence_logs=50) as local, Client(local) as client:
                yield client
        else:
            try:
                client = Client(address, timeout=CONNECT_SECONDS)
            except (OSError, TimeoutError) as err:
                raise UserError(f"cannot reach the Dask scheduler at {address} ({err}); start it "
                                "(dask scheduler), or check --scheduler") from None
            with client:
                yield client
    except UserError:
        raise
    except (OSError, TimeoutError) as err:
        raise UserError(f"lost the Dask scheduler at {address or 'this machine'} ({err}); run the "
                        "same command again: the experiments already pushed are skipped") from None
    except Exception as err:
        if type(err).__name__ in ("CommClosedError", "StreamClosedError", "CancelledError",
                                  "FutureCancelledError"):
            raise UserError(f"lost the Dask scheduler at {address or 'this machine'} "
                            f"({type(err).__name__}); run the same command again: the experiments "
                            "already pushed are skipped") from None
        raise
