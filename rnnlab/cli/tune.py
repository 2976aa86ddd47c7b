"""`rnnlab tune`: an Optuna study whose trials are DVC experiments on a Dask cluster
(rnnlab/cluster/tune.py, docs/cluster.md). Needs the `cluster` extra (Dask, Optuna)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rnnlab.cli.sweep import add_cluster_args, check_cluster_args, cluster, cores
from rnnlab.errors import UserError
from rnnlab.redact import public_uri


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="an Optuna search whose trials are DVC experiments",
                       description="Search a space of settings with Optuna (TPE): each trial a "
                       "DVC experiment on a Dask cluster's workers, its objective the variant's "
                       "best validation perplexity, reported per epoch so that a pruner can stop "
                       "bad trials early. Running it again continues the study.")
    add_cluster_args(p)
    p.add_argument("-P", "--param", dest="space", action="append", default=[], metavar="KEY=KIND(ARGS)",
                   help="a dimension: 'train.lr=loguniform(1e-4,1e-1)', 'train.dropout=uniform(0,0.5)', "
                   "'variants.lstm.num_layers=int(1,3)', 'train.optimizer=choice(sgd,adam)'")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study should have (default 20)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                   help="stops a trial whose perplexity lags others at the same epoch (default median)")
    p.add_argument("--variant", help="the variant to tune (default: the only one in params.yaml)")
    p.add_argument("--study", default="tune", help="the study's name, and its experiments' prefix (default tune)")
    p.add_argument("--storage", help="the study's database URL (default: RNNLAB_OPTUNA_STORAGE; "
                   "with --local, optuna.db here)")
    p.add_argument("--seed", type=int, help="the sampler's seed")
    p.add_argument("--max-failures", type=int, metavar="N", help="stop after N failed trials "
                   "(default: --trials)")
    p.add_argument("--max-consecutive-failures", type=int, default=5, metavar="N",
                   help="stop after N failed trials in a row (default 5)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from rnnlab.cluster import sweep, tune
    from rnnlab.cluster.trust import check_name

    check_cluster_args(args)
    check_name("--study", args.study)
    for flag, value in (("--trials", args.trials), ("--max-failures", args.max_failures),
                        ("--max-consecutive-failures", args.max_consecutive_failures)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give at least 1")
    repo = Path.cwd()
    what = tune.search(repo, args.space, args.variant)  # before any store or cluster
    cpus = cores(args)
    local = args.local is not None
    plan = sweep.where(repo, remote=args.remote, cpus=cpus, gpus=args.gpus, local=local)
    study = tune.open_study(repo, what, name=args.study, storage=args.storage,
                            pruner=args.pruner, plan=plan, local=local, seed=args.seed)
    failures = tune.Failures(args.max_failures or args.trials, args.max_consecutive_failures)
    have = tune.finished_trials(study.study)
    print(f"tune: study {args.study!r} ({public_uri(study.storage)}): {have} finished "
          f"trial(s), {max(0, args.trials - have)} to go; variant {study.variant}", flush=True)
    with cluster(args, cpus) as client:
        made = tune.run(study, client, args.trials, slots(client, cpus), failures)
    sweep.pull(plan, made)
    tune.report(study, repo)


def slots(client, cpus: int) -> int:
    """How many trials the workers can run at once: their cores / the cores of one."""
    workers = client.scheduler_info()["workers"].values()
    return max(1, sum(int(w.get("resources", {}).get("cpus", 0)) // cpus for w in workers))
