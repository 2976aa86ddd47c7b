"""`rnnlab sweep`: a grid of DVC experiments run on a Dask cluster, then pulled back here.

    rnnlab sweep -S train.lr=0.001,0.002 -S train.dropout=0,0.2 --scheduler tls://host:8786
    rnnlab sweep -S train.lr=0.001,0.002 --local 2

`plan` checks what a worker will need before anything runs (a clean working tree, the base
commit on the git remote, a DVC remote, a tracking server a worker can reach, every combination
valid) and skips the experiments the git remote already has; `share_inputs` pushes download and
tokenize's outputs once; `run` sends one `Job` per experiment (rnnlab/cluster/worker.py) and
prints what is done, running where, and failed; `pull` brings every experiment back. `--local N`
starts N workers here, the repository their git and DVC remote unless --remote names one.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rnnlab.cluster import grid
from rnnlab.cluster.job import Job, Outcome
from rnnlab.errors import UserError
from rnnlab.redact import credentials_in, public_uri

POLL_SECONDS = 1.0


@dataclass
class Plan:
    repo: Path
    base: str
    git_url: str
    own_remote: bool                 # the repository is its own git and DVC remote (--local)
    dvc_remote: dict[str, str]
    tracking_uri: str
    cpus: int
    gpus: int
    sweep: str = ""                  # its id (sweep_id, or a study's): a tag of every run it makes
    jobs: list[Job] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # on the git remote already

    def job(self, name: str, settings: tuple[str, ...], targets: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> Job:
        return Job(name=name, settings=settings, base=self.base, git_url=self.git_url,
                   dvc_remote=self.dvc_remote, tracking_uri=self.tracking_uri, sweep=self.sweep,
                   cpus=self.cpus, gpus=self.gpus, targets=targets, env=dict(env or {}))


def where(repo: Path, *, remote: str | None, cpus: int, gpus: int, local: bool) -> Plan:
    """Where the experiments of this repository's HEAD would run from and go to, checked: a
    plan without experiments yet."""
    require_clean(repo)
    base = git(repo, "rev-parse", "HEAD")
    git_url = git_remote(repo, remote, local)
    own = git_url == str(repo)
    if not own:
        require_pushed(repo, base, git_url)
    dvc_remote = {"url": str(repo / ".dvc" / "cache")} if own else dvc_remote_of(repo)
    return Plan(repo, base, git_url, own, dvc_remote, sweep_tracking_uri(repo, local), cpus, gpus)


def plan(repo: Path, combos: list[tuple[str, ...]], *, remote: str | None, prefix: str, cpus: int,
         gpus: int, local: bool) -> Plan:
    """The sweep of `combos` (grid.expand's), every check done; nothing runs yet."""
    grid.check(repo, combos)
    p = where(repo, remote=remote, cpus=cpus, gpus=gpus, local=local)
    p.sweep = sweep_id(p, prefix)
    jobs = [p.job(grid.name(prefix, p.base, combo), combo) for combo in combos]
    pushed = pushed_experiments(repo, p.git_url, p.base)
    p.jobs = [j for j in jobs if j.name not in pushed]
    p.skipped = [j.name for j in jobs if j.name in pushed]
    return p


def sweep_id(p: Plan, prefix: str) -> str:
    """The same for the same command on the same repository and commit, so that a second run
    supersedes what the first left (and nothing of another sweep): a digest of the git remote
    (for --local: this machine and folder), the base commit and the name prefix."""
    origin = f"{socket.gethostname()}:{p.repo}" if p.own_remote else p.git_url
    return hashlib.sha1(f"{origin}\n{p.base}\n{prefix}".encode()).hexdigest()[:12]


# --- checks --------------------------------------------------------------------------------------

def require_clean(repo: Path) -> None:
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True).stdout.splitlines()
    if dirty:
        files = ", ".join(line[3:] for line in dirty[:5]) + (", ..." if len(dirty) > 5 else "")
        raise UserError(f"uncommitted changes ({files}): a sweep runs the committed code on other "
                        "machines; commit them (and push), or stash them")


def git_remote(repo: Path, name: str | None, local: bool) -> str:
    """The git remote's URL: `name`; else with --local the repository itself (its workers share
    this machine); else the one the branch tracks, or the only one."""
    if name is None and local:
        return str(repo)
    if name is None:
        tracked = git(repo, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}", check=False)
        name = tracked.split("/", 1)[0] if tracked else None
    if name is None:
        remotes = git(repo, "remote").split()
        if len(remotes) == 1:
            name = remotes[0]
        else:
            raise UserError("no git remote to run the sweep from: the branch tracks none; name one "
                            f"with --remote ({', '.join(remotes) or 'this repository has none'})")
    url = git(repo, "remote", "get-url", name, check=False)
    if not url:
        raise UserError(f"--remote {name}: no such git remote here (git remote -v lists them)")
    if credentials_in(url):
        raise UserError(f"git remote {name} = {public_uri(url)} carries a login, which would travel "
                        "to every worker; use a credential helper or SSH keys on the workers")
    return url


def require_pushed(repo: Path, base: str, url: str) -> None:
    """The workers clone the base commit from the remote: it must be there."""
    heads = git(repo, "ls-remote", url, check=False, what=f"reach the git remote {public_uri(url)}")
    if base in heads.split():
        return
    fetched = subprocess.run(["git", "fetch", "-q", url, base], cwd=repo, capture_output=True)
    if fetched.returncode != 0:
        raise UserError(f"commit {base[:12]} is not on the git remote {public_uri(url)}: push it "
                        "first (git push), since the workers clone it from there")


def dvc_remote_of(repo: Path) -> dict[str, str]:
    """The default DVC remote's url and endpointurl, as this clone's config has them (the team
    stack writes it to .dvc/config.local, which a worker's clone lacks)."""
    name = dvc(repo, "remote", "default", check=False)
    if not name:
        raise UserError("no default DVC remote: the workers send the experiments' outputs there; "
                        "add one (dvc remote add --default NAME URL), or use --local")
    remote = {"url": dvc(repo, "config", f"remote.{name}.url")}
    endpoint = dvc(repo, "config", f"remote.{name}.endpointurl", check=False)
    if endpoint:
        remote["endpointurl"] = endpoint
    if credentials_in(remote["url"]):
        raise UserError(f"DVC remote {name} = {public_uri(remote['url'])} carries a login; keep "
                        "keys in the workers' environment (AWS_ACCESS_KEY_ID, ...)")
    return remote


def sweep_tracking_uri(repo: Path, local: bool) -> str:
    """Where the workers record runs: this shell's MLflow server without the login (which stays
    here: each worker has its own), or for --local the repository's store (the working
    directory is the repository)."""
    from rnnlab.tracking.store import tracking_uri

    uri = tracking_uri()  # a login written into the URI moves to MLFLOW_TRACKING_USERNAME/_PASSWORD
    if credentials_in(uri):
        raise UserError(f"MLFLOW_TRACKING_URI {public_uri(uri)} carries {credentials_in(uri)[0]}, "
                        "which would travel to every worker; keep the password in the workers' "
                        "environment (PGPASSFILE, MLFLOW_TRACKING_PASSWORD)")
    if uri.startswith("sqlite:") and not local:
        raise UserError("a sweep on a cluster records its runs on an MLflow server every worker "
                        "reaches: set MLFLOW_TRACKING_URI (the team set-up: docs/team.md), or use --local")
    ready_store(uri)
    return uri


def ready_store(uri: str) -> None:
    """The server answers and takes this login; a local store exists (made here, once: workers
    making a new SQLite store at the same moment race its schema migration)."""
    from rnnlab.tracking.store import check_login, check_reachable, store_lock

    check_reachable(uri)
    if uri.startswith("sqlite:"):
        with store_lock(uri):
            check_login(uri)


def pushed_experiments(repo: Path, url: str, base: str) -> set[str]:
    """The names of the experiments of `base` that the git remote has."""
    refs = git(repo, "ls-remote", url, f"refs/exps/{base[:2]}/{base[2:]}/*", check=False)
    return {line.rsplit("/", 1)[-1] for line in refs.splitlines() if line.strip()}


def share_inputs(p: Plan) -> str:
    """Send the shared stages' outputs to the DVC remote once (the workers pull them): a line
    saying so, or that the workers will make them."""
    if p.own_remote:
        return "the workers read the shared inputs from this repository's cache"
    proc = subprocess.run([dvc_bin(), "push", "-q", "--with-deps", "tokenize"], cwd=p.repo,
                          capture_output=True, text=True, env=quiet_env())
    if proc.returncode == 0:
        return "the shared inputs (download, tokenize) are on the DVC remote"
    return ("the shared inputs are not in this clone's cache (dvc repro tokenize makes them): "
            "each worker makes its own")


# --- running -------------------------------------------------------------------------------------

@dataclass
class Progress:
    """What is done, running where (the workers' events), and failed; a line when it changes."""

    total: int
    done: list[Outcome] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    running: dict[str, str] = field(default_factory=dict)  # name -> "<step> on <worker>"
    last: str = ""

    def event(self, event) -> None:
        """A worker's event (rnnlab/cluster/worker.py `tell`): (time, {name, step, where})."""
        msg = event[1] if isinstance(event, tuple) else event
        self.running[msg["name"]] = f"{msg['step']} on {msg['where']}"

    def ended(self, name: str) -> None:
        self.running.pop(name, None)

    def line(self) -> str:
        where = "; ".join(f"{name} {what}" for name, what in sorted(self.running.items()))
        return (f"sweep: {len(self.done)}/{self.total} done, {len(self.running)} running"
                f"{f' ({where})' if where else ''}, {len(self.failed)} failed")

    def say(self) -> None:
        now = self.line()
        if now != self.last:
            print(now, flush=True)
            self.last = now


def resources(p: Plan) -> dict[str, int]:
    """What one experiment asks of a worker (Dask resources)."""
    return {"cpus": p.cpus, **({"gpus": p.gpus} if p.gpus else {})}


def submit(client, p: Plan, job: Job):
    """One experiment to the cluster: a Dask future of its Outcome."""
    from rnnlab.cluster import worker

    return client.submit(worker.run, job, key=f"rnnlab-{job.name}-{uuid.uuid4().hex[:6]}",
                         pure=False, resources=resources(p), retries=0)


def run(p: Plan, client) -> Progress:
    """Submit every job, report as they go, return when all ended."""
    from rnnlab.cluster import worker

    require_resources(client, resources(p))
    futures = {submit(client, p, job): job.name for job in p.jobs}
    progress = Progress(len(futures))
    client.subscribe_topic(worker.TOPIC, progress.event)
    pending = set(futures)
    while pending:
        time.sleep(POLL_SECONDS)
        finished = {f for f in pending if f.done()}
        pending -= finished
        for future in finished:
            progress.ended(futures[future])
            if future.status == "cancelled":  # we cancel nothing: the scheduler went away
                raise ConnectionError("the scheduler cancelled the experiments")
            if future.status == "finished":
                progress.done.append(future.result())
            else:
                progress.failed.append(failure(futures[future], future))
        client.scheduler_info()  # raises when the scheduler is gone
        progress.say()
    return progress


def failure(name: str, future) -> str:
    err = future.exception()
    if isinstance(err, UserError):
        return str(err)
    from distributed.scheduler import KilledWorker

    if isinstance(err, KilledWorker):
        return f"{name}: its worker died on every attempt ({err})"
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{name}: {type(err).__name__}: {first}"


def require_resources(client, wanted: dict[str, int]) -> None:
    """Some worker must offer what each experiment asks, or the sweep would wait forever."""
    workers = client.scheduler_info()["workers"].values()
    if not workers:
        raise UserError("the Dask scheduler has no workers: start some (dask worker ADDRESS "
                        "--resources cpus=N; docs/cluster.md)")
    if not any(all(w.get("resources", {}).get(k, 0) >= v for k, v in wanted.items()) for w in workers):
        have = sorted({str(w.get("resources") or {}) for w in workers})
        ask = ",".join(f"{k}={v}" for k, v in wanted.items())
        raise UserError(f"no worker offers {ask} (they offer {'; '.join(have)}): start workers with "
                        f"--resources {ask} or more, or ask for less (--cpus, --gpus)")


def pull(p: Plan, names: list[str]) -> None:
    """Bring the experiments here: their git refs and their outputs."""
    if p.own_remote or not names:
        return
    proc = subprocess.run([dvc_bin(), "exp", "pull", p.git_url, *names], cwd=p.repo,
                          capture_output=True, text=True, env=quiet_env())
    if proc.returncode != 0:
        raise UserError(f"dvc exp pull {public_uri(p.git_url)} failed: "
                        f"{(proc.stderr or proc.stdout).strip().splitlines()[-1]}")


# --- helpers -------------------------------------------------------------------------------------

def git(repo: Path, *args: str, check: bool = True, what: str | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if check and proc.returncode != 0:
        problem = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"cannot {what or 'run git ' + args[0]}: {problem}")
    return proc.stdout.strip() if proc.returncode == 0 else ""


def dvc(repo: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run([dvc_bin(), *args], cwd=repo, capture_output=True, text=True, env=quiet_env())
    if check and proc.returncode != 0:
        raise UserError(f"dvc {' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip() if proc.returncode == 0 else ""


def dvc_bin() -> str:
    return str(Path(sys.executable).with_name("dvc"))


def quiet_env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
            "DVC_NO_ANALYTICS": "1"}
