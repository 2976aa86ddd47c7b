"""One experiment on a Dask worker: `run(job)`, as a user would type it on that machine.

    git clone <origin> && git checkout <base>       the sweep's commit, in a folder of its own
    dvc pull --with-deps tokenize                   the shared inputs, made once by the submitter
    dvc exp run -n <name> -S ... -S train.threads=<cpus the worker gave it>
    dvc exp push <origin> <name>                    the commit to git, the outputs to the remote

Each experiment has its own clone and DVC cache (under RNNLAB_SWEEP_DIR, else `sweeps/` of the
cache folder; deleted once pushed), so no two run a stage in one repository at once. A failure
is one UserError line naming the step and what it could not reach. A worker killed mid-run takes
its commands with it (rnnlab/cluster/guard.py); the rerun elsewhere first marks the killed
attempt's MLflow runs KILLED, tagged `rnnlab.superseded` (`supersede`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rnnlab.cluster import guard as guard_file
from rnnlab.cluster.job import Job, Outcome
from rnnlab.cluster.trust import accept
from rnnlab.errors import UserError
from rnnlab.fileio import cache_dir
from rnnlab.redact import public_text, public_uri

TOPIC = "rnnlab-sweep"  # Dask events: each step an experiment starts, for the submitter's progress
SHARED = "tokenize"  # the stage whose outputs (with its upstream's) every experiment shares
REMOTE = "sweep"     # the DVC remote's name in a clone's own config
WORK_ENV = "RNNLAB_SWEEP_DIR"
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1"}


def run(job: Job) -> Outcome:
    """Run `job` here; its outcome, or a UserError of one line (a job this worker does not accept
    among them: rnnlab/cluster/trust.py)."""
    accept(job)
    where = worker_name()
    folder = work_dir() / job.sweep / job.name
    shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt's, on this machine
    folder.parent.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    env = stage_env(job)
    with timed("clone", seconds, job.name):
        sh(job, "clone the git remote " + public_uri(job.git_url), folder.parent, env,
           "git", "clone", "-q", "--no-checkout", job.git_url, folder.name)
        sh(job, f"check out commit {job.base[:12]}", folder, env, "git", "checkout", "-q", job.base)
        if job.dvc_remote:
            add_remote(job, folder)
    with timed("pull", seconds, job.name):
        pulled = sh(job, None, folder, env, dvc(), "pull", "-q", "--with-deps", SHARED, check=False)
    if job.tracking_uri:
        supersede(job)
    with timed("run", seconds, job.name):
        sh(job, "run it", folder, env, dvc(), "exp", "run", "-n", job.name,
           *[arg for s in settings(job) for arg in ("-S", s)], *job.targets, guard=True)
    with timed("push", seconds, job.name):
        sh(job, "push it to " + public_uri(job.git_url), folder, env,
           dvc(), "exp", "push", job.git_url, job.name)
    metrics = read_metrics(folder)
    shutil.rmtree(folder, ignore_errors=True)
    if pulled.returncode != 0:
        seconds["pull"] = -seconds["pull"]  # the shared inputs were made here, not pulled
    return Outcome(job.name, where, seconds, metrics)


def settings(job: Job) -> list[str]:
    """The experiment's -S values, and what this worker gives it: its cores, its GPU."""
    given = [f"train.threads={job.cpus}"] + (["train.device=cuda"] if job.gpus else [])
    return [*job.settings, *given]


def stage_env(job: Job) -> dict[str, str]:
    """The commands' environment: this worker's (its logins), the sweep's tracking server and
    tags, the trial's own variable (the only one a job may set: `accept`), no experiment or
    Python path of the worker's own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DVC_EXP_NAME", "PYTHONPATH", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env.update(QUIET, RNNLAB_SWEEP=job.sweep, RNNLAB_ATTEMPT=uuid.uuid4().hex[:12],
               RNNLAB_WORKER=worker_name(), **job.env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if job.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = job.tracking_uri
    return env


def add_remote(job: Job, folder: Path) -> None:
    """The sweep's DVC remote as the clone's default, in its own .dvc/config.local (what `dvc
    remote add --local --default` writes; written directly: each dvc command costs a second)."""
    remote = job.dvc_remote or {}
    lines = ["[core]", f"    remote = {REMOTE}", f"['remote \"{REMOTE}\"']"]
    lines += [f"    {key} = {value}" for key, value in remote.items()]
    (folder / ".dvc" / "config.local").write_text("\n".join(lines) + "\n")


def earlier_attempts(job: Job) -> str:
    """The MLflow filter of the runs of earlier attempts at `job`: the same experiment name, of
    the same sweep or study (its id) and base commit. A run of another sweep, study or repository
    that happens to share the name, or one made by hand, never matches. (Names and ids are
    checked by `accept`: no quote can end the string.)"""
    return (f"tags.`rnnlab.dvc_exp` = '{job.name}' and tags.`rnnlab.sweep` = '{job.sweep}' "
            f"and tags.`rnnlab.git_commit` = '{job.base}'")


def supersede(job: Job) -> None:
    """Mark every MLflow run of an earlier attempt at this experiment (its worker was killed, or
    its push failed) KILLED, tagged rnnlab.superseded=true: this attempt runs every stage again,
    and one FINISHED run per variant remains, its own."""
    try:  # the login: this worker's own environment, as its stages see it
        from mlflow import MlflowClient

        client = MlflowClient(job.tracking_uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, filter_string=earlier_attempts(job)) if ids else []
        for found in runs:
            if found.data.tags.get("rnnlab.superseded") != "true":
                client.set_tag(found.info.run_id, "rnnlab.superseded", "true")
            if found.info.status != "KILLED":
                client.set_terminated(found.info.run_id, status="KILLED")
    except Exception as err:  # noqa: BLE001 - named in one line below
        from rnnlab.tracking.store import first_line, is_refusal, refusal_error

        if is_refusal(err):
            raise UserError(f"{job.name}: {refusal_error(err, job.tracking_uri or '', 'to search runs')}"
                            ) from None
        raise UserError(f"{job.name}: cannot reach the MLflow server at "
                        f"{public_uri(job.tracking_uri or '')}: {public_text(first_line(err))}") from None


def read_metrics(folder: Path) -> dict[str, dict]:
    """evaluate's metrics of every variant: variant -> {test_ppl, val_ppl, ...}, and `pruned_at`
    where a study stopped its training (train.json)."""
    metrics = {}
    for path in sorted((folder / "metrics/variants").glob("*.json")):
        metrics[path.stem] = json.loads(path.read_text())
        trained = folder / "models" / path.stem / "train.json"
        if trained.is_file() and "pruned_at" in (summary := json.loads(trained.read_text())):
            metrics[path.stem]["pruned_at"] = summary["pruned_at"]
    return metrics


def sh(job: Job, what: str | None, cwd: Path, env: dict[str, str], *cmd: str, check: bool = True,
       guard: bool = False) -> subprocess.CompletedProcess:
    """Run `cmd`; a failure is a UserError: `<experiment>: cannot <what>: <its error line>`.
    guard: the command dies with this worker, its children too (rnnlab/cluster/guard.py)."""
    # the guard by its path: it needs nothing but the standard library, and no PYTHONPATH
    args = guard_file.command(str(cwd), *cmd) if guard else list(cmd)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, start_new_session=guard)
    if check and proc.returncode != 0:
        raise UserError(f"{job.name}: cannot {what}: {error_line(proc.stdout + proc.stderr)}")
    return proc


def error_line(output: str) -> str:
    """The line that says what went wrong: the first `error:` line of a stage, else DVC's or
    git's, else the last line; secrets masked."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for prefix in ("error:", "ERROR:", "fatal:"):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return public_text(found[0].removeprefix(prefix).strip())
    return public_text(lines[-1] if lines else "no output")


def dvc() -> str:
    return str(Path(sys.executable).with_name("dvc"))


def work_dir() -> Path:
    return Path(os.environ.get(WORK_ENV) or cache_dir() / "sweeps")


def tell(name: str, step: str) -> None:
    """A Dask event {name, step, where}: the submitter's progress shows what runs where."""
    try:
        from distributed import get_worker

        get_worker().log_event(TOPIC, {"name": name, "step": step, "where": worker_name()})
    except (ImportError, ValueError):  # not on a Dask worker
        pass


def worker_name() -> str:
    """This machine and Dask worker, as the progress lines show it."""
    try:
        from distributed import get_worker

        return f"{socket.gethostname()} {get_worker().address}"
    except (ImportError, ValueError):
        return socket.gethostname()


@contextmanager
def timed(step: str, seconds: dict[str, float], name: str = "") -> Iterator[None]:
    """Time `step` into `seconds`; tell the submitter it started (a Dask event)."""
    tell(name, step)
    start = time.monotonic()
    try:
        yield
    finally:
        seconds[step] = round(time.monotonic() - start, 2)
