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
GRID_CAP = 1000       # a larger grid needs --yes


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
    p.add_argument("--name", default="sweep", help="the experiments' name prefix (default: sweep; "
                   "letters, digits, _ . -)")
    p.add_argument("--yes", action="store_true", help=f"run a grid of more than {GRID_CAP} experiments")
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
    tls = p.add_argument_group("TLS (a --scheduler's; --local makes its own)")
    tls.add_argument("--tls-ca-file", metavar="PEM", help="the lab's CA certificate (default: "
                     "Dask's config distributed.comm.tls.ca-file)")
    tls.add_argument("--tls-cert", metavar="PEM", help="this submitter's certificate (default: "
                     "distributed.comm.tls.client.cert)")
    tls.add_argument("--tls-key", metavar="PEM", help="its key (default: distributed.comm.tls.client.key)")
    tls.add_argument("--insecure", action="store_true", help="allow a plain tcp:// scheduler: anyone "
                     "who reaches it can run code on its workers")


def check_cluster_args(args: argparse.Namespace) -> None:
    """What needs no file, server or cluster, checked before anything starts: one line each."""
    from rnnlab.cluster.security import check_address

    if args.local is not None and args.local < 1:
        raise UserError(f"--local {args.local}: give at least one worker")
    if args.cpus is not None and args.cpus < 1:
        raise UserError(f"--cpus {args.cpus}: give at least 1 core per experiment")
    if args.gpus < 0:
        raise UserError(f"--gpus {args.gpus}: give 0 or more GPUs per experiment")
    if args.scheduler is not None:
        args.scheduler = check_address(args.scheduler, args.insecure)


def cores(args: argparse.Namespace) -> int:
    """Cores per experiment: --cpus; else with --local N this machine's cores / N; else 1."""
    return args.cpus or (max(1, (os.cpu_count() or 1) // args.local) if args.local else 1)


def run(args: argparse.Namespace) -> None:
    from rnnlab.cluster import grid, sweep
    from rnnlab.cluster.trust import check_name

    check_cluster_args(args)
    check_name("--name", args.name)
    combos = grid.expand(args.settings)
    if len(combos) > GRID_CAP and not args.yes:
        raise UserError(f"-S: {len(combos)} experiments (more than {GRID_CAP}); add --yes to run "
                        "them all, or narrow the grid")
    cpus = cores(args)
    repo = Path.cwd()
    p = sweep.plan(repo, combos, remote=args.remote, prefix=args.name, cpus=cpus,
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


def security(args: argparse.Namespace):
    """The submitter's TLS for --scheduler: None for an --insecure tcp:// one."""
    from rnnlab.cluster.security import client_security

    if args.scheduler.startswith("tls://"):
        return client_security(args.tls_ca_file, args.tls_cert, args.tls_key)
    return None


@contextmanager
def cluster(args: argparse.Namespace, cpus: int) -> Iterator[object]:
    """A Dask client over TLS: of the scheduler named, or of a local cluster of --local workers
    (a certificate of this run only). Losing the scheduler is one error line."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserError("rnnlab sweep needs Dask: pip install -e '.[cluster]' (make setup "
                        "installs it)") from None
    from rnnlab.cluster.security import local_security

    address = args.scheduler
    try:
        if args.local:
            with LocalCluster(n_workers=args.local, threads_per_worker=1, processes=True,
                              resources={"cpus": cpus}, dashboard_address=None,
                              protocol="tls://", host="127.0.0.1", security=local_security(),
                              silence_logs=50) as local, Client(local) as client:
                print(f"sweep: {args.local} local worker(s), scheduler {local.scheduler_address} "
                      "(TLS, a certificate of this run only)", flush=True)
                yield client
        else:
            tls = security(args)
            try:
                client = Client(address, timeout=CONNECT_SECONDS, security=tls)
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
