"""`rnnlab sweep` and `rnnlab tune` on a real Dask cluster, as a lab runs them (docs/cluster.md).

One cluster for the module, set up as docs/cluster.md says: the lab's certificates from `rnnlab
cluster certs`, `dask scheduler` and two `dask worker` processes over TLS with them, each worker
with its own HOME and work folder as two machines would have (cores: 1 each); the submitter's
certificate comes from Dask's config (DASK_DISTRIBUTED__COMM__TLS__* in its environment). The remotes are the team stack's
(tests/conftest.py `team`): a bare git origin, the DVC remote in its S3 bucket, the MLflow server
with basic-auth, each worker logged in as the member. The submitter is a clone of the origin.

- a 4-experiment grid ends with each experiment once in `dvc exp show`, one FINISHED MLflow run per
  experiment and variant with DVC's numbers to the digit, and each experiment applies here byte for
  byte; the same command again trains nothing;
- a worker killed (SIGKILL) in the middle of a training: its experiment runs again on the other
  worker, and the end state is the same, the killed attempt's run KILLED and tagged superseded;
- a worker with a wrong MLflow password: one line for its experiment, the other finishes;
- `rnnlab tune` on a space where low learning rates are clearly bad: trials are pruned, the best
  is the high rate, and running it again continues the study.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.settings import free_port
from deploy.stack import remote_commands
from deploy.throwaway import shell_env
from tests.repos import copy_repo

# runs_of() logs in through os.environ: environment_restored puts it back (conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("environment_restored")]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXPERIMENT = "cluster-sweeps"


def tiny(params: dict) -> None:
    params["data"]["max_tokens"] = 3000
    params["train"].update(epochs=2, hidden_size=16, num_steps=8, batch_size=8, threads=1)
    params["variants"] = {"rnn": {"cell": "rnn"}}
    params["tracking"]["experiment"] = EXPERIMENT


def sh(*cmd, cwd: Path, env: dict, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tls_args(certs: Path, role: str) -> list[str]:
    """`dask scheduler` / `dask worker`'s TLS flags, as docs/cluster.md gives them."""
    return ["--tls-ca-file", certs / "ca.pem", "--tls-cert", certs / f"{role}.pem",
            "--tls-key", certs / f"{role}-key.pem"]


def submitter_tls(certs: Path, name: str = "ann") -> dict[str, str]:
    """A submitter's certificate through Dask's config, in the environment."""
    return {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(certs / "ca.pem"),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(certs / f"{name}.pem"),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(certs / f"{name}-key.pem")}


def security(certs: Path, name: str = "ann"):
    from distributed import Security

    return Security(tls_ca_file=str(certs / "ca.pem"), tls_client_cert=str(certs / f"{name}.pem"),
                    tls_client_key=str(certs / f"{name}-key.pem"), require_encryption=True)


@dataclass
class Cluster:
    address: str
    folder: Path
    login: dict[str, str]
    certs: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)  # name -> process
    ports: dict[str, int] = field(default_factory=dict)

    def env(self, name: str, login: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        home = self.folder / name
        home.mkdir(parents=True, exist_ok=True)
        return shell_env(login or self.login, HOME=str(home), RNNLAB_SWEEP_DIR=str(home / "work"),
                         PYTHONPATH=str(ROOT), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra)

    def start_worker(self, name: str, login: dict[str, str] | None = None, **extra: str) -> None:
        port = self.ports.setdefault(name, free_port())
        log = open(self.folder / f"{name}.log", "ab")
        self.workers[name] = subprocess.Popen(
            [BIN / "dask", "worker", self.address, "--name", name, "--nthreads", "1", "--no-nanny",
             "--resources", "cpus=1", "--worker-port", str(port), "--no-dashboard",
             "--local-directory", str(self.folder / name / "dask"), *tls_args(self.certs, "worker")],
            env=self.env(name, login, **extra), stdout=log, stderr=subprocess.STDOUT, cwd=self.folder / name)
        wait_for_workers(self, len(self.workers))

    def stop_worker(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.workers.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=60)

    def submitter_env(self, login: dict[str, str]) -> dict[str, str]:
        """A member's shell on the submitter's machine, its certificate in Dask's config."""
        return {**user_env(login), **submitter_tls(self.certs)}

    def worker_of(self, address: str) -> str:
        return next(n for n, p in self.ports.items() if address.endswith(f":{p}"))


def wait_for_workers(cluster: Cluster, n: int, seconds: float = 90) -> None:
    from distributed import Client

    with Client(cluster.address, timeout=30, security=security(cluster.certs)) as client:
        client.wait_for_workers(n, timeout=seconds)
        while len(client.scheduler_info()["workers"]) != n:  # a stopped one may linger a moment
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(team, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    certs = folder / "certs"
    sh(sys.executable, "-m", "rnnlab.cli.main", "cluster", "certs", certs, "--submitter", "ann",
       "--host", "127.0.0.1", cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT)})
    port = free_port()
    scheduler = subprocess.Popen([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port",
                                  str(port), "--no-dashboard", "--protocol", "tls",
                                  *tls_args(certs, "scheduler")], cwd=folder,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)},  # it unpickles the jobs
                                 stdout=open(folder / "scheduler.log", "wb"), stderr=subprocess.STDOUT)
    # the workers' login is a service's (deploy.stack user --service), not a member's
    service = team.user_env("sweepworkers", service=True)
    team.cli("grant", "sweepworkers", EXPERIMENT, "EDIT")
    c = Cluster(f"tls://127.0.0.1:{port}", folder, service, certs)
    try:
        for name in ("w1", "w2"):
            c.start_worker(name)
        yield c
    finally:
        for proc in [*c.workers.values(), scheduler]:
            proc.terminate()
        for proc in [*c.workers.values(), scheduler]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def submitter(team, tmp_path_factory) -> Path:
    """The lab's repository on the submitter's machine: a clone of a bare origin, the team's DVC
    remote in its own config, the shared inputs (tokenize) in its dvc.lock, pushed."""
    base = tmp_path_factory.mktemp("lab")
    project = copy_repo(base / "project", tiny)
    origin = base / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    env = user_env(team.env)
    sh("git", "push", "-q", origin, "HEAD:main", cwd=project, env=env)
    repo = base / "submitter"
    sh("git", "clone", "-q", "-b", "main", origin, repo, cwd=base, env=env)
    for cmd in remote_commands(team.stack):
        sh(BIN / cmd[0], *cmd[1:], cwd=repo, env=env)
    sh(BIN / "dvc", "repro", "tokenize", cwd=repo, env=env)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "the shared inputs",
       cwd=repo, env=env)
    sh("git", "push", "-q", cwd=repo, env=env)
    team.cli("grant", team.env["MLFLOW_TRACKING_USERNAME"], EXPERIMENT, "EDIT")
    return repo


def user_env(login: dict[str, str]) -> dict[str, str]:
    return shell_env(login, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))


def rnnlab(repo: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "rnnlab.cli.main", *args, cwd=repo, env=env, check=check)


def exp_show(repo: Path, env: dict) -> dict[str, dict]:
    found = {}
    for baseline in json.loads(sh(BIN / "dvc", "exp", "show", "--json", cwd=repo, env=env).stdout):
        for exp in baseline.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = data["metrics"]["metrics/variants/rnn.json"]["data"]
    return found


def runs_of(login: dict[str, str], name: str) -> list:
    from mlflow import MlflowClient

    os.environ.update({k: v for k, v in login.items() if k.startswith("MLFLOW_")})
    client = MlflowClient(login["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`rnnlab.dvc_exp` = '{name}'")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


GRID = ["-S", "train.lr=0.01,0.03", "-S", "train.seed=1,2", "--name", "grid"]


def test_a_grid_on_two_workers_comes_back_as_four_experiments_and_their_runs(cluster, submitter,
                                                                           team, tmp_path):
    env = cluster.submitter_env(team.env)
    out = rnnlab(submitter, env, "sweep", "--scheduler", cluster.address, *GRID).stdout
    names = re.findall(r"^  (grid-[0-9a-f]{7}): ", out, re.M)
    assert len(set(names)) == 4, out
    assert "sweep: 4/4 done, 0 running, 0 failed" in out, out
    where = set(re.findall(r" on \S+ (tls://127\.0\.0\.1:\d+): ", out))
    assert {cluster.worker_of(a) for a in where} == {"w1", "w2"}, out  # both workers took some

    shown = exp_show(submitter, env)
    assert set(names) <= set(shown)
    for name in names:
        (run,) = [r for r in runs_of(team.env, name) if r.info.status == "FINISHED"]
        assert run.data.metrics["test_ppl"] == shown[name]["test_ppl"]
        assert run.data.metrics["summary.val_ppl"] == shown[name]["val_ppl"]
        assert run.data.tags["rnnlab.worker"].split()[-1] in where
        assert run.data.params["train.threads"] == "1"  # the core its worker gave it
    # each experiment applies here, byte for byte what its run logged
    from mlflow import MlflowClient

    client = MlflowClient(team.env["MLFLOW_TRACKING_URI"])
    for name in names[:2]:
        sh(BIN / "dvc", "exp", "apply", name, cwd=submitter, env=env)
        (run,) = [r for r in runs_of(team.env, name) if r.info.status == "FINISHED"]
        got = Path(client.download_artifacts(run.info.run_id, "checkpoint/best.pt", str(tmp_path / name)))
        assert md5(submitter / "models/rnn/best.pt") == md5(got)
        assert "Running stage" not in sh(BIN / "dvc", "repro", cwd=submitter, env=env).stdout
    sh("git", "checkout", "-q", "--", ".", cwd=submitter, env=env)

    again = rnnlab(submitter, env, "sweep", "--scheduler", cluster.address, *GRID).stdout
    assert "4 already pushed (skipped)" in again and "nothing to run" in again, again


def test_a_worker_killed_mid_training_reruns_its_experiment_elsewhere_counted_once(
        cluster, submitter, team):
    env = cluster.submitter_env(team.env)
    proc = subprocess.Popen([sys.executable, "-m", "rnnlab.cli.main", "sweep", "--scheduler",
                             cluster.address, "-S", "train.lr=0.01,0.02", "-S", "train.epochs=30",
                             "--name", "kill"], cwd=submitter, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, victim = [], None
    for line in proc.stdout:
        seen.append(line)
        found = re.search(r"(kill-[0-9a-f]{7}) run on \S+ (tls://\S+?)[;)]", line)
        if found:
            victim = found.group(1), cluster.worker_of(found.group(2))
            break
    assert victim, "".join(seen)
    deadline = time.monotonic() + 300
    while not any(r.info.status == "RUNNING" and r.data.metrics.get("val_ppl")
                  for r in runs_of(team.env, victim[0])):  # in the middle of its training
        assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
        time.sleep(0.5)
    cluster.stop_worker(victim[1], signal.SIGKILL)
    cluster.start_worker(victim[1])  # the machine back: the rerun may go to either worker
    seen += proc.stdout.readlines()
    assert proc.wait(timeout=900) == 0, "".join(seen)

    names = set(re.findall(r"^  (kill-[0-9a-f]{7}): ", "".join(seen), re.M))
    assert len(names) == 2
    shown = exp_show(submitter, env)
    assert names <= set(shown)
    runs = runs_of(team.env, victim[0])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1, [(r.info.status, r.data.tags.get("rnnlab.superseded")) for r in runs]
    assert finished[0].data.metrics["test_ppl"] == shown[victim[0]]["test_ppl"]
    killed = [r for r in runs if r.info.status != "FINISHED"]
    assert killed and all(r.data.tags.get("rnnlab.superseded") == "true" for r in killed)
    assert all(r.info.status == "KILLED" for r in killed)


def test_a_worker_refused_by_mlflow_fails_its_experiment_in_one_line(cluster, submitter, team):
    bad = {**cluster.login, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    cluster.stop_worker("w2")
    cluster.start_worker("w2", bad)
    try:
        env = cluster.submitter_env(team.env)
        proc = rnnlab(submitter, env, "sweep", "--scheduler", cluster.address, "-S",
                      "train.lr=0.011,0.012", "--name", "refused", check=False)
    finally:
        cluster.stop_worker("w2")
        cluster.start_worker("w2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert re.match(r"error: refused-[0-9a-f]{7}: the MLflow server at http://127\.0\.0\.1:\d+ "
                    r"refused the password of user '\w+' \(401 Unauthorized\)", errors[0]), errors
    assert "not-the-password" not in proc.stdout + proc.stderr
    assert "1 of 2 experiments failed" in errors[1]
    assert "sweep: 1/2 done" in proc.stdout


def test_tune_prunes_bad_trials_finds_the_best_and_resumes(cluster, submitter, team, tmp_path):
    """The study in the member's own database of the team's PostgreSQL; the workers' service
    role reports each epoch to it."""
    env = cluster.submitter_env(team.env)
    assert env["RNNLAB_OPTUNA_STORAGE"].startswith("postgresql")
    # seed 8 (then 8 + 2 on the second run): the first two trials draw high rates (0.042, 0.080),
    # the next two 0.021 and 0.0001, which the median pruner stops after an epoch. The study is
    # named `tune`, the default, as test_two_studies_... below needs.
    args = ["tune", "--scheduler", cluster.address, "-P", "train.lr=loguniform(1e-4,0.1)", "--seed", "8"]
    first = rnnlab(submitter, env, *args, "--trials", "2").stdout
    assert re.search(r"tune: \d trial\(s\) complete, \d pruned; best: trial \d", first), first
    second = rnnlab(submitter, env, *args, "--trials", "4").stdout
    assert "2 finished trial(s), 2 to go" in second, second
    import optuna

    os.environ.update(PGUSER=env["PGUSER"], PGPASSWORD=env["PGPASSWORD"])  # the member's login
    study = optuna.load_study(study_name="tune", storage=env["RNNLAB_OPTUNA_STORAGE"])
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 4, states
    assert "PRUNED" in states, states
    best = study.best_trial
    assert best.params["train.lr"] > 0.01  # the clearly good end of the range
    assert f"dvc exp apply tune-{best.number}" in second
    pruned = next(t for t in study.trials if t.state.name == "PRUNED")
    (run,) = runs_of(team.env, f"tune-{pruned.number}")
    assert run.data.tags["rnnlab.pruned"] == "true"
    assert f"tune-{pruned.number}" in exp_show(submitter, env)  # still an experiment
    assert (submitter / "tune/tune/history.png").read_bytes()[:4] == b"\x89PNG"


OUTSIDER = """
import os, sys, pathlib
from distributed import Client, Security
address, mark, how, certs = sys.argv[1:]
security = {"other-ca": Security.temporary(), "none": None}.get(how) or Security(
    tls_ca_file=f"{certs}/ca.pem", tls_client_cert=f"{certs}/{how}.pem",
    tls_client_key=f"{certs}/{how}-key.pem", require_encryption=True)
try:
    with Client(address, timeout=10, security=security) as client:
        print("got in:", client.run(lambda: os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) and "password")
        client.run(lambda: pathlib.Path(mark).write_text("ran"))
except Exception as err:
    print("refused:", type(err).__name__)
"""


def test_an_outsider_cannot_reach_the_lab_cluster_a_member_can(cluster, tmp_path):
    """A process with nothing of the lab's (env -i), without a certificate, with one of another
    CA, or over plain TCP, cannot connect: `Client.run` never runs. The member's certificate gets
    in (the refusals are TLS's, not a broken cluster)."""
    mark = tmp_path / "outsider-ran"
    tcp = cluster.address.replace("tls://", "tcp://")
    for address, how in ((cluster.address, "none"), (cluster.address, "other-ca"), (tcp, "none")):
        got = sh("env", "-i", f"PATH={os.environ['PATH']}", f"PYTHONPATH={ROOT}", sys.executable, "-c",
                 OUTSIDER, address, mark, how, cluster.certs, cwd=tmp_path, env={}, timeout=120)
        assert got.stdout.startswith("refused:"), (address, how, got.stdout, got.stderr[-1500:])
    assert not mark.exists()
    member = sh("env", "-i", f"PATH={os.environ['PATH']}", f"PYTHONPATH={ROOT}", sys.executable, "-c",
                OUTSIDER, cluster.address, mark, "ann", cluster.certs, cwd=tmp_path, env={}, timeout=120)
    assert member.stdout.startswith("got in: password"), member.stdout + member.stderr[-1500:]
    mark.unlink()


def test_a_worker_with_an_allow_list_refuses_another_remote(cluster, submitter, team):
    """w2 alone, started with RNNLAB_WORKER_GIT_REMOTES that leaves out the lab's origin: the
    experiment is refused in one line before anything is cloned."""
    cluster.stop_worker("w1")
    cluster.stop_worker("w2")
    cluster.start_worker("w2", RNNLAB_WORKER_GIT_REMOTES="https://git.lab.example/*")
    try:
        proc = rnnlab(submitter, cluster.submitter_env(team.env), "sweep", "--scheduler",
                      cluster.address, "-S", "train.lr=0.013", "--name", "allow", check=False)
    finally:
        cluster.stop_worker("w2")
        for name in ("w1", "w2"):
            cluster.start_worker(name)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert re.fullmatch(r"error: allow-[0-9a-f]{7}: refused by the worker: git remote '\S+origin.git' "
                        r"is not in this worker's RNNLAB_WORKER_GIT_REMOTES \(https://git.lab.example/\*\)",
                        errors[0]), errors
    assert not list((cluster.folder / "w2" / "work").rglob("allow-*"))  # nothing cloned


def test_two_studies_of_one_name_and_a_hand_made_experiment_keep_their_runs(cluster, submitter, team,
                                                                            tmp_path):
    """Two members' studies named `tune` (default), in two repositories with their own study
    stores, sharing the MLflow server, and a hand-made `dvc exp run -n tune-0`: every one of them
    ends with its own FINISHED run of tune-0; none supersedes another's. The first study is the
    submitter's of the test above (run here if that test did not run)."""
    env = cluster.submitter_env(team.env)
    space = ["-P", "train.lr=loguniform(0.01,0.05)", "--trials", "1", "--pruner", "none"]
    if not [r for r in runs_of(team.env, "tune-0") if r.data.tags.get("rnnlab.sweep")]:
        rnnlab(submitter, env, "tune", "--scheduler", cluster.address, *space)
    origin_b = tmp_path / "origin-b.git"
    sh("git", "clone", "-q", "--bare", submitter, origin_b, cwd=tmp_path, env=env)  # branches, no exps
    clone_b = tmp_path / "b"
    sh("git", "clone", "-q", "-b", "main", origin_b, clone_b, cwd=tmp_path, env=env)
    hand = tmp_path / "hand"
    sh("git", "clone", "-q", "-b", "main", submitter, hand, cwd=tmp_path, env=env)
    for repo in (clone_b, hand):
        for cmd in remote_commands(team.stack):
            sh(BIN / cmd[0], *cmd[1:], cwd=repo, env=env)
    by_hand = subprocess.Popen([BIN / "dvc", "exp", "run", "-n", "tune-0", "-S", "train.lr=0.02"],
                               cwd=hand, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rnnlab(clone_b, {**env, "RNNLAB_OPTUNA_STORAGE": f"sqlite:///{tmp_path}/b.db"}, "tune",
           "--scheduler", cluster.address, *space)
    assert by_hand.wait(timeout=600) == 0, by_hand.stdout.read()

    runs = runs_of(team.env, "tune-0")
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3, [
        (r.info.status, r.data.tags.get("rnnlab.sweep"), r.data.tags.get("rnnlab.superseded")) for r in runs]
    sweeps = [r.data.tags.get("rnnlab.sweep") for r in runs]
    assert sweeps.count(None) == 1 and len(set(sweeps)) == 3  # by hand, and each study's own id
    assert not any(r.data.tags.get("rnnlab.superseded") for r in runs)
