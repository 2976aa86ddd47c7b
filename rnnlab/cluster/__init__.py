"""Sweeps beyond one machine (docs/cluster.md): every experiment of a grid (`rnnlab sweep`) or an
Optuna study (`rnnlab tune`) runs on a Dask worker, in a clone of its own, and comes back as a DVC
experiment and MLflow runs. The `cluster` extra installs Dask and Optuna; nothing else imports
this package.

    grid.py      DVC's -S syntax expanded into experiments, each named by what it runs
    space.py     a search space on the command line (`rnnlab tune -P`), as Optuna distributions
    job.py       what a worker needs to run one experiment, and what comes back
    trust.py     what a worker accepts of a job: plain data, allow-listed remotes
    security.py  TLS with client certificates between submitter, scheduler and workers
    worker.py    one experiment on a worker: clone, pull, `dvc exp run`, `dvc exp push`
    guard.py     the process guard: the experiment's commands die with the worker that ran them
    sweep.py     the submitter: checks, the cluster, progress, `dvc exp pull`
    tune.py      an Optuna study whose trials are such experiments
"""
