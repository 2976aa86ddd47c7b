"""What a worker needs to run one experiment (`Job`), and what comes back (`Outcome`). Both
travel through Dask by pickle: plain data, no secret (logins stay in each worker's environment)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Job:
    name: str                        # the DVC experiment's name (grid.name)
    settings: tuple[str, ...]        # its -S values
    base: str                        # the commit it runs from
    git_url: str                     # where the worker clones from and pushes the experiment to
    dvc_remote: dict[str, str] | None  # the DVC remote's url (and endpointurl): None = the clone's own
    tracking_uri: str | None         # the MLflow server (no login in it); None = the clone's mlflow.db
    sweep: str                       # the sweep's id, a tag of every run it makes
    cpus: int = 1                    # the cores the worker gives it: train.threads
    gpus: int = 0                    # > 0: train.device=cuda
    targets: tuple[str, ...] = ()    # the stages to run (dvc exp run's targets); () = all
    env: dict[str, str] = field(default_factory=dict)  # more of the stages' environment (tune's trial)


@dataclass(frozen=True)
class Outcome:
    name: str
    where: str                       # the worker (host and address) that ran it
    seconds: dict[str, float]        # clone, pull, run, push: the cost of each step
    metrics: dict[str, dict]         # variant -> evaluate's metrics
