"""Sweeps beyond one machine (docs/cluster.md): every experiment of a grid (`rnnlab sweep`) or an
Optuna study (`rnnlab tune`) runs on a worker of a Dask cluster, in a clone of its own, and comes
back as a DVC experiment (git origin and DVC remote) and MLflow runs (the tracking server).

    grid.py      DVC's -S syntax expanded into experiments, each named by what it runs
    job.py       what a worker needs to run one experiment, and what comes back
    worker.py    one experiment on a worker: clone, pull, `dvc exp run`, `dvc exp push`
    sweep.py     the submitter: checks, the cluster, progress, `dvc exp pull`
    tune.py      an Optuna study whose trials are such experiments

The `cluster` extra installs Dask and Optuna; nothing else imports this package.
"""
