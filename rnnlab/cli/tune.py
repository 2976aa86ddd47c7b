"""`rnnlab tune`: an Optuna study whose trials are DVC experiments on a Dask cluster
(rnnlab/cluster/tune.py, docs/cluster.md). Needs the `cluster` extra (Dask, Optuna)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rnnlab.cli.sweep import add_cluster_args, cluster, cores
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from rnnlab.cluster import sweep, tune

    if args.trials < 1:
        raise UserError(f"--trials {args.trials}: give at least 1")
    repo = Path.cwd()
    cpus = cores(args)
    local = args.local is not None
    plan = sweep.where(repo, remote=args.remote, cpus=cpus, gpus=args.gpus, local=local)
    study = tune.open_study(repo, args.space, name=args.study, storage=args.storage,
                            variant=args.variant, pruner=args.pruner, plan=plan, local=local,
                            seed=args.seed)
    have = tune.finished_trials(study.study)
    print(f"tune: study {args.study!r} ({public_uri(study.storage)}): {have} finished "
          f"trial(s), {max(0, args.trials - have)} to go; variant {study.variant}", flush=True)
    with cluster(args, cpus) as client:
        made = tune.run(study, client, args.trials, slots(client, cpus))
    sweep.pull(plan, made)
    tune.report(study, repo)


def slots(client, cpus: int) -> int:
    """How many trials the workers can run at once: their cores / the cores of one."""
    workers = client.scheduler_info()["workers"].values()
    return max(1, sum(int(w.get("resources", {}).get("cpus", 0)) // cpus for w in workers))
