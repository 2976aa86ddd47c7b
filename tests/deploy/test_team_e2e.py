"""The team set-up end to end, on a real local stack (PostgreSQL, S3, MLflow with basic-auth):

- several machines at once: a bare git repository is `origin`; two clones ("machines", each its own
  user) run different experiments at the same time, tracking to the server and pushing to the DVC
  remote; a third clone pulls both, compares them in `dvc exp show`, applies one without training
  again, and finds both MLflow runs FINISHED with DVC's numbers to the digit and their artifacts
  downloadable through the server;
- faults: the MLflow server restarted while a training runs (nothing lost, the run ends FINISHED);
  the server gone for good (one error; `dvc repro` finishes the job later); the stack down and up
  again keeps every run, user and object. (A push while the object store is down is DVC's own
  error and retry: DVC's to test.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from deploy.processes import stop
from deploy.stack import remote_commands
from tests.deploy.teamstack import shell_env
from tests.repos import copy_repo

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
EXPERIMENT = "team-e2e"   # the lab's shared MLflow experiment


def tiny(params: dict) -> None:
    params["data"]["max_tokens"] = 3000
    params["train"].update(epochs=2, hidden_size=16, num_steps=8, batch_size=8, threads=1)
    params["variants"] = {"rnn": {"cell": "rnn"}}
    params["tracking"]["experiment"] = EXPERIMENT


def clean_env(login: dict[str, str]) -> dict[str, str]:
    """A user's shell with the environment activated: the stack's exports, the venv's tools."""
    return shell_env(login, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def sh(*cmd: str, cwd: Path, env: dict, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def machine(origin: Path, dest: Path, env: dict, stack) -> Path:
    """A clone of origin with the team's DVC remote in its own config, as `make team-up` adds it."""
    sh("git", "clone", "-q", "-b", "main", str(origin), str(dest), cwd=dest.parent, env=env)
    for cmd in remote_commands(stack):
        sh(str(BIN / cmd[0]), *cmd[1:], cwd=dest, env=env)
    return dest


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def mlflow_client(login: dict[str, str]):
    """An MlflowClient logged in as `login` (credentials are read from the environment)."""
    from mlflow import MlflowClient

    os.environ.update(login)
    return MlflowClient(login["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module", autouse=True)
def environment_restored():
    """mlflow_client() logs in through os.environ: leave it as it was for the tests after these."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A bare repository holding a tiny copy of the project on `main`."""
    base = tmp_path_factory.mktemp("git")
    project = copy_repo(base / "project", tiny)
    bare = base / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    subprocess.run(["git", "push", "-q", str(bare), "HEAD:main"], cwd=project, check=True)
    return bare


def exp_show(repo: Path, env: dict) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> metrics/variants/rnn.json's numbers."""
    found = {}
    for baseline in json.loads(sh(str(BIN / "dvc"), "exp", "show", "--json", cwd=repo, env=env).stdout):
        for exp in baseline.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = data["metrics"]["metrics/variants/rnn.json"]["data"]
    return found


def test_two_machines_at_once_and_a_third_that_pulls_both(team, origin, tmp_path):
    stack = team.stack
    alice, ben = team.user_env("alice"), team.user_env("ben")
    for user in ("alice", "ben"):  # the lab's shared experiment: both may add runs
        team.cli("grant", user, EXPERIMENT, "EDIT")
    machines = {"alice": (alice, "exp-alice", "0.01"), "ben": (ben, "exp-ben", "0.02")}
    repos = {u: machine(origin, tmp_path / u, clean_env(login), stack) for u, (login, _, _) in machines.items()}

    def work(user: str, results: dict) -> None:
        login, exp, lr = machines[user]
        env, repo = clean_env(login), repos[user]
        try:
            sh(str(BIN / "dvc"), "exp", "run", "-n", exp, "-S", f"train.lr={lr}", "evaluate@rnn",
               cwd=repo, env=env)
            results[user] = sh(str(BIN / "dvc"), "exp", "push", "origin", exp, cwd=repo, env=env).stdout
        except AssertionError as err:
            results[user] = err

    results: dict = {}
    threads = [threading.Thread(target=work, args=(u, results)) for u in machines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for user, result in results.items():
        assert not isinstance(result, Exception), f"{user}: {result}"
        assert "Pushed experiment" in result

    # the third machine: pulls both, compares, applies one without training
    carol = team.user_env("carol")
    env = clean_env(carol)
    third = machine(origin, tmp_path / "carol", env, stack)
    for _, exp, _ in machines.values():
        sh(str(BIN / "dvc"), "exp", "pull", "origin", exp, cwd=third, env=env)
    shown = exp_show(third, env)
    assert {"exp-alice", "exp-ben"} <= set(shown)
    assert shown["exp-alice"]["val_ppl"] != shown["exp-ben"]["val_ppl"]  # two different experiments
    table = sh(str(BIN / "dvc"), "exp", "show", "--md", cwd=third, env=env).stdout
    assert "exp-alice" in table and "exp-ben" in table

    sh(str(BIN / "dvc"), "exp", "apply", "exp-alice", cwd=third, env=env)
    assert md5(third / "models/rnn/best.pt") == md5(repos["alice"] / "models/rnn/best.pt")
    repro = sh(str(BIN / "dvc"), "repro", "evaluate@rnn", cwd=third, env=env)
    assert "Running stage" not in repro.stdout, repro.stdout  # nothing trains again
    assert json.loads((third / "metrics/variants/rnn.json").read_text()) == shown["exp-alice"]

    # both MLflow runs, found from the experiments' names; DVC's numbers to the digit
    client = mlflow_client(carol)  # carol only reads (default READ)
    for user, (_, exp, lr) in machines.items():
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                  filter_string=f"tags.`rnnlab.dvc_exp` = '{exp}'")
        assert len(runs) == 1, f"{exp}: {len(runs)} runs"
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == lr
        dvc_metrics = shown[exp]
        for key in ("test_ppl", "best_epoch", "uniform_ppl"):
            assert run.data.metrics[key] == dvc_metrics[key], key
        assert run.data.metrics["summary.val_ppl"] == dvc_metrics["val_ppl"]
        # and back: the run names its experiment
        assert run.data.tags["rnnlab.dvc_exp"] == exp
        # the artifacts download through the server
        dest = tmp_path / "artifacts" / exp
        client.download_artifacts(run.info.run_id, "", str(dest))
        assert md5(dest / "checkpoint/best.pt") == md5(repos[user] / "models/rnn/best.pt")
        assert (dest / "samples/rnn.md").read_text() == (repos[user] / "metrics/samples/rnn.md").read_text()
        assert (dest / "curves/curves.png").read_bytes()[:4] == b"\x89PNG"


def start_training(repo: Path, env: dict, *settings: str) -> subprocess.Popen:
    """`dvc repro train@rnn` after `-S`-like edits of params.yaml, output line by line."""
    for setting in settings:
        sh(str(BIN / "python"), "-c", (
            "import sys, yaml; k, v = sys.argv[1].split('='); p = yaml.safe_load(open('params.yaml'));"
            "s, key = k.split('.'); p[s][key] = yaml.safe_load(v);"
            "open('params.yaml', 'w').write(yaml.safe_dump(p, sort_keys=False))"), setting, cwd=repo, env=env)
    return subprocess.Popen([str(BIN / "dvc"), "repro", "train@rnn"], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def read_until(proc: subprocess.Popen, text: str, seen: list[str]) -> None:
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"the training ended before {text!r}:\n{''.join(seen)}")


def runs_of(team, repo: Path) -> list:
    client = mlflow_client(team.env)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return [r for r in client.search_runs([exp.experiment_id], filter_string="tags.`rnnlab.dvc_stage` = 'train@rnn'")
            if r.data.tags.get("rnnlab.data_sha1") and r.info.run_name == "rnn"
            and r.data.params.get("train.seed") == str(SEED[repo.name])]


SEED = {"restart": 11, "gone": 12}   # tells the two fault tests' runs apart
FAULT_EPOCHS = 8


def fault_repo(team, origin: Path, dest: Path) -> tuple[Path, dict]:
    env = clean_env(team.env)
    repo = machine(origin, dest, env, team.stack)
    return repo, env


def epochs_logged(team, run_id: str) -> list[int]:
    client = mlflow_client(team.env)
    return sorted(m.step for m in client.get_metric_history(run_id, "val_ppl"))


def test_a_server_restart_during_training_loses_nothing(team, origin, tmp_path):
    repo, env = fault_repo(team, origin, tmp_path / "restart")
    team.cli("grant", team.env["MLFLOW_TRACKING_USERNAME"], EXPERIMENT, "EDIT")
    proc = start_training(repo, env, f"train.epochs={FAULT_EPOCHS}", "data.max_tokens=30000",
                          f"train.seed={SEED['restart']}")
    seen: list[str] = []
    read_until(proc, "epoch   2/", seen)
    assert stop("mlflow", team.paths)  # the server goes away mid-training ...
    read_until(proc, "does not answer", seen)  # ... the training notices at its next write ...
    team.cli("up")                     # ... and it comes back (about 8 s later)
    seen += proc.stdout.readlines()
    assert proc.wait(timeout=600) == 0, "".join(seen)
    out = "".join(seen)
    assert "does not answer" in out and "answers again" in out, out  # the outage was noticed
    (run,) = runs_of(team, repo)
    assert run.info.status == "FINISHED"
    assert epochs_logged(team, run.info.run_id) == list(range(1, FAULT_EPOCHS + 1))
    summary = json.loads((repo / "models/rnn/train.json").read_text())
    assert run.data.metrics["best_val_ppl"] == summary["best_val_ppl"]
    assert (repo / "metrics/curves/rnn.csv").read_text().count("\n") == FAULT_EPOCHS + 1
    status = sh(str(BIN / "dvc"), "status", "train@rnn", cwd=repo, env=env).stdout
    assert "up to date" in status, status


def test_a_server_gone_for_good_is_one_error_and_repro_finishes_later(team, origin, tmp_path):
    repo, env = fault_repo(team, origin, tmp_path / "gone")
    team.cli("grant", team.env["MLFLOW_TRACKING_USERNAME"], EXPERIMENT, "EDIT")
    proc = start_training(repo, env, f"train.epochs={FAULT_EPOCHS}", "data.max_tokens=30000",
                          f"train.seed={SEED['gone']}", "tracking.patience=2")
    seen: list[str] = []
    try:
        read_until(proc, "epoch   2/", seen)
        assert stop("mlflow", team.paths)
        seen += proc.stdout.readlines()
        code = proc.wait(timeout=600)
    finally:
        team.cli("up")
    out = "".join(seen)
    assert code != 0, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost the MLflow tracking server" in errors[0], out
    assert "Traceback" not in out
    assert (repo / "checkpoints/rnn/resume.pt").exists()  # the training's state is kept

    again = sh(str(BIN / "dvc"), "repro", "train@rnn", cwd=repo, env=env).stdout
    assert f"resuming after epoch {FAULT_EPOCHS}" in again, again
    (run,) = runs_of(team, repo)
    assert run.info.status == "FINISHED"
    assert epochs_logged(team, run.info.run_id) == list(range(1, FAULT_EPOCHS + 1))  # each once


def test_down_then_up_keeps_every_run_user_and_object(team, tmp_path):
    """`make team-down` then `make team-up`: the runs (PostgreSQL), the users (mlflow_auth) and
    the objects of both buckets (moto's recording, replayed) are all there again."""
    from deploy.settings import DVC_BUCKET
    from deploy.stack import s3_client

    stack = team.stack
    dave = team.user_env("dave")
    client = mlflow_client(dave)
    exp_id = client.create_experiment("persisted")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "val_ppl", 4.25, step=3)
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 1000)  # binary, 256 kB
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.bin"))
    client.set_terminated(run.info.run_id)
    s3_client(stack).put_object(Bucket=DVC_BUCKET, Key="rnnlab/check", Body=b"\x00\xffdvc")

    team.cli("down")
    assert "down" in team.cli("status").stdout
    team.cli("up")

    client = mlflow_client(dave)  # dave's login still works
    again = client.get_run(run.info.run_id)
    assert again.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_ppl")] == [(3, 4.25)]
    got = Path(client.download_artifacts(run.info.run_id, "weights.bin", str(tmp_path / "back")))
    assert got.read_bytes() == (tmp_path / "weights.bin").read_bytes()
    assert s3_client(stack).get_object(Bucket=DVC_BUCKET, Key="rnnlab/check")["Body"].read() == b"\x00\xffdvc"
