"""`rnnlab sweep` and `rnnlab tune` on a real Dask cluster, as a lab runs them (docs/cluster.md).

One cluster for the module: `dask scheduler` and two `dask worker` processes, each with its own
HOME and work folder as two machines would have (cores: 1 each). The remotes are the team stack's
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
from tests.deploy.teamstack import shell_env
from tests.repos import copy_repo

pytestmark = pytest.mark.slow
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


@dataclass
class Cluster:
    address: str
    folder: Path
    login: dict[str, str]
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)  # name -> process
    ports: dict[str, int] = field(default_factory=dict)

    def env(self, name: str, login: dict[str, str] | None = None) -> dict[str, str]:
        home = self.folder / name
        home.mkdir(parents=True, exist_ok=True)
        return shell_env(login or self.login, HOME=str(home), RNNLAB_SWEEP_DIR=str(home / "work"),
                         PYTHONPATH=str(ROOT), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")

    def start_worker(self, name: str, login: dict[str, str] | None = None) -> None:
        port = self.ports.setdefault(name, free_port())
        log = open(self.folder / f"{name}.log", "ab")
        self.workers[name] = subprocess.Popen(
            [BIN / "dask", "worker", self.address, "--name", name, "--nthreads", "1", "--no-nanny",
             "--resources", "cpus=1", "--worker-port", str(port), "--no-dashboard",
             "--local-directory", str(self.folder / name / "dask")],
            env=self.env(name, login), stdout=log, stderr=subprocess.STDOUT, cwd=self.folder / name)
        wait_for_workers(self, len(self.workers))

    def stop_worker(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.workers.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=60)

    def worker_of(self, address: str) -> str:
        return next(n for n, p in self.ports.items() if address.endswith(f":{p}"))


def wait_for_workers(cluster: Cluster, n: int, seconds: float = 90) -> None:
    from distributed import Client

    with Client(cluster.address, timeout=30) as client:
        client.wait_for_workers(n, timeout=seconds)
        while len(client.scheduler_info()["workers"]) != n:  # a stopped one may linger a moment
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(team, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    port = free_port()
    scheduler = subprocess.Popen([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port",
                                  str(port), "--no-dashboard"], cwd=folder,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)},  # it unpickles the jobs
                                 stdout=open(folder / "scheduler.log", "wb"), stderr=subprocess.STDOUT)
    c = Cluster(f"tcp://127.0.0.1:{port}", folder, team.env)
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


@pytest.fixture(scope="module", autouse=True)
def environment_restored():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


GRID = ["-S", "train.lr=0.01,0.03", "-S", "train.seed=1,2", "--name", "grid"]


def test_a_grid_on_two_workers_comes_back_as_four_experiments_and_their_runs(cluster, submitter,
                                                                           team, tmp_path):
    env = user_env(team.env)
    out = rnnlab(submitter, env, "sweep", "--scheduler", cluster.address, *GRID).stdout
    names = re.findall(r"^  (grid-[0-9a-f]{7}): ", out, re.M)
    assert len(set(names)) == 4, out
    assert "sweep: 4/4 done, 0 running, 0 failed" in out, out
    where = set(re.findall(r" on \S+ (tcp://127\.0\.0\.1:\d+): ", out))
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
    env = user_env(team.env)
    proc = subprocess.Popen([sys.executable, "-m", "rnnlab.cli.main", "sweep", "--scheduler",
                             cluster.address, "-S", "train.lr=0.01,0.02", "-S", "train.epochs=30",
                             "--name", "kill"], cwd=submitter, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, victim = [], None
    for line in proc.stdout:
        seen.append(line)
        found = re.search(r"(kill-[0-9a-f]{7}) run on \S+ (tcp://\S+?)[;)]", line)
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
    bad = {**team.env, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    cluster.stop_worker("w2")
    cluster.start_worker("w2", bad)
    try:
        env = user_env(team.env)
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
    env = {**user_env(team.env), "RNNLAB_OPTUNA_STORAGE": f"sqlite:///{tmp_path}/study.db"}
    # seed 8: the first three trials draw high rates (0.042, 0.081, 0.041), the next three low
    # ones (0.0003, 0.0001, 0.0025), which the median pruner stops after an epoch
    args = ["tune", "--scheduler", cluster.address, "-P", "train.lr=loguniform(1e-4,0.1)",
            "--study", "lr-study", "--seed", "8"]
    first = rnnlab(submitter, env, *args, "--trials", "3").stdout
    assert re.search(r"tune: \d trial\(s\) complete, \d pruned; best: trial \d", first), first
    second = rnnlab(submitter, env, *args, "--trials", "6").stdout
    assert "3 finished trial(s), 3 to go" in second, second
    import optuna

    study = optuna.load_study(study_name="lr-study", storage=env["RNNLAB_OPTUNA_STORAGE"])
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 6, states
    assert "PRUNED" in states, states
    best = study.best_trial
    assert best.params["train.lr"] > 0.01  # the clearly good end of the range
    assert f"dvc exp apply lr-study-{best.number}" in second
    pruned = next(t for t in study.trials if t.state.name == "PRUNED")
    (run,) = runs_of(team.env, f"lr-study-{pruned.number}")
    assert run.data.tags["rnnlab.pruned"] == "true"
    assert f"lr-study-{pruned.number}" in exp_show(submitter, env)  # still an experiment
    assert (submitter / "tune/lr-study/history.png").read_bytes()[:4] == b"\x89PNG"
