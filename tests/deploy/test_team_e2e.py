"""The team set-up end to end, on a real local stack (PostgreSQL, S3, MLflow with basic-auth):

- several machines at once: a bare git repository is `origin`; two clones ("machines", each its own
  user) run different experiments at the same time, tracking to the server and pushing to the DVC
  remote; a third clone pulls both, compares them in `dvc exp show`, applies one without training
  again, and finds both MLflow runs FINISHED with DVC's numbers to the digit and their artifacts
  downloadable through the server;
- no secret anywhere: every secret the stack and the stages handle is planted with an unmistakable
  value (deploy/throwaway.py; the corpus itself comes from a local server that wants a
  bearer token, RNNLAB_DOWNLOAD_TOKEN), and after the three machines' work none of them is in any
  file of the clones (their DVC caches and git objects too), the git origin, the DVC remote's
  objects, the MLflow runs' params, tags and artifacts, any command's output, the stack's logs,
  or any command line that `ps` showed while the stages ran;
- faults: the MLflow server restarted while a training runs (nothing lost, the run ends FINISHED);
  the server gone for good (one error; `dvc repro` finishes the job later); the stack down and up
  again keeps every run, user and object. (A push while the object store is down is DVC's own
  error and retry: DVC's to test.)
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import secrets
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.processes import stop
from deploy.settings import ARTIFACT_BUCKET, DVC_BUCKET
from deploy.stack import remote_commands, s3_client
from deploy.throwaway import PLANTED, shell_env, stack_secrets
from rnnlab.corpora import BUILTIN
from rnnlab.redact import TOKEN_ENV, TOKEN_HOSTS_ENV
from tests.deploy.leaks import CommandLines, git_objects, leaks, leaks_in_files
from tests.repos import copy_repo

# mlflow_client() logs in through os.environ: environment_restored puts it back (conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("environment_restored")]
BIN = Path(sys.executable).parent
EXPERIMENT = "team-e2e"   # the lab's shared MLflow experiment
TOKEN = f"{PLANTED}download-token-{secrets.token_hex(4)}"  # the corpus server's bearer token
OUTPUTS: list[str] = []   # what every command printed (stdout and stderr), for the leak test


class CorpusServer(http.server.ThreadingHTTPServer):
    """The Time Machine over HTTP on 127.0.0.1, for requests that bear TOKEN (else 401)."""

    def __init__(self):
        text = BUILTIN["timemachine"].bundled_path().read_bytes()
        self.served = self.refused = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805 - the server is `self` here
                if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self.refused += 1
                    handler.send_error(401)
                    return
                self.served += 1
                handler.send_response(200)
                handler.send_header("Content-Length", str(len(text)))
                handler.end_headers()
                handler.wfile.write(text)

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/timemachine.txt"


@pytest.fixture(scope="module")
def corpus_server():
    server = CorpusServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def tiny(params: dict, source: str) -> None:
    params["data"].update(max_tokens=3000, source=source)
    params["train"].update(epochs=2, hidden_size=16, num_steps=8, batch_size=8, threads=1)
    params["variants"] = {"rnn": {"cell": "rnn"}}
    params["tracking"]["experiment"] = EXPERIMENT


def clean_env(login: dict[str, str]) -> dict[str, str]:
    """A user's shell with the environment activated: the stack's exports, the venv's tools, the
    corpus server's token."""
    return shell_env(login, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                     **{TOKEN_ENV: TOKEN, TOKEN_HOSTS_ENV: "127.0.0.1"})


def sh(*cmd: str, cwd: Path, env: dict, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=timeout)
    OUTPUTS.append(result.stdout + result.stderr)
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


@pytest.fixture(scope="module")
def origin(tmp_path_factory, corpus_server):
    """A bare repository holding a tiny copy of the project on `main`, its corpus from the
    corpus server."""
    base = tmp_path_factory.mktemp("git")
    project = copy_repo(base / "project", lambda params: tiny(params, corpus_server.url))
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


@dataclass
class Lab:
    """What the lab's three machines did: their clones and logins, the two experiments'
    `dvc exp push` outputs, and every command line `ps` showed meanwhile."""

    repos: dict[str, Path]           # alice, ben, carol -> the clone
    logins: dict[str, dict]          # user -> the exports of `deploy.stack user`
    pushed: dict[str, object]        # alice, ben -> `dvc exp push`'s output, or the error
    ps: CommandLines


MACHINES = {"alice": ("exp-alice", "0.01"), "ben": ("exp-ben", "0.02")}  # user: experiment, lr


@pytest.fixture(scope="module")
def lab(team, origin, tmp_path_factory) -> Lab:
    """Two machines run an experiment each at the same time, tracked to the server and pushed to
    the DVC remote; a third pulls both, applies one and reproduces it (nothing trains)."""
    base = tmp_path_factory.mktemp("lab")
    logins = {user: team.user_env(user) for user in ("alice", "ben", "carol")}
    for user in MACHINES:  # the lab's shared experiment: both may add runs
        team.cli("grant", user, EXPERIMENT, "EDIT")
    repos = {u: machine(origin, base / u, clean_env(logins[u]), team.stack) for u in MACHINES}

    def work(user: str, results: dict) -> None:
        exp, lr = MACHINES[user]
        env, repo = clean_env(logins[user]), repos[user]
        try:
            sh(str(BIN / "dvc"), "exp", "run", "-n", exp, "-S", f"train.lr={lr}", "evaluate@rnn",
               cwd=repo, env=env)
            results[user] = sh(str(BIN / "dvc"), "exp", "push", "origin", exp, cwd=repo, env=env).stdout
        except AssertionError as err:
            results[user] = err

    pushed: dict = {}
    with CommandLines() as ps:
        threads = [threading.Thread(target=work, args=(u, pushed)) for u in MACHINES]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not any(isinstance(r, Exception) for r in pushed.values()):
            env = clean_env(logins["carol"])
            third = repos["carol"] = machine(origin, base / "carol", env, team.stack)
            for exp, _ in MACHINES.values():
                sh(str(BIN / "dvc"), "exp", "pull", "origin", exp, cwd=third, env=env)
            sh(str(BIN / "dvc"), "exp", "apply", "exp-alice", cwd=third, env=env)
    return Lab(repos, logins, pushed, ps)


def test_two_machines_at_once_and_a_third_that_pulls_both(team, lab, tmp_path):
    for user, result in lab.pushed.items():
        assert not isinstance(result, Exception), f"{user}: {result}"
        assert "Pushed experiment" in result
    repos = lab.repos

    # the third machine pulled both, compares them, applied one without training
    env, third = clean_env(lab.logins["carol"]), repos["carol"]
    shown = exp_show(third, env)
    assert {"exp-alice", "exp-ben"} <= set(shown)
    assert shown["exp-alice"]["val_ppl"] != shown["exp-ben"]["val_ppl"]  # two different experiments
    table = sh(str(BIN / "dvc"), "exp", "show", "--md", cwd=third, env=env).stdout
    assert "exp-alice" in table and "exp-ben" in table

    assert md5(third / "models/rnn/best.pt") == md5(repos["alice"] / "models/rnn/best.pt")
    repro = sh(str(BIN / "dvc"), "repro", "evaluate@rnn", cwd=third, env=env)
    assert "Running stage" not in repro.stdout, repro.stdout  # nothing trains again
    assert json.loads((third / "metrics/variants/rnn.json").read_text()) == shown["exp-alice"]

    # both MLflow runs, found from the experiments' names; DVC's numbers to the digit
    client = mlflow_client(lab.logins["carol"])  # carol only reads (default READ)
    for user, (exp, lr) in MACHINES.items():
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


def bucket_objects(stack, bucket: str) -> dict[str, bytes]:
    """Every object of an S3 bucket of the stack, by key."""
    client = s3_client(stack)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def test_no_planted_secret_anywhere_a_tracked_pipeline_wrote_or_showed(team, lab, origin,
                                                                      corpus_server):
    planted = {**stack_secrets(team.stack), "the download token": TOKEN,
               **{f"{user}'s MLflow password": login["MLFLOW_TRACKING_PASSWORD"]
                  for user, login in lab.logins.items()}}
    assert all(value.startswith(PLANTED) for value in stack_secrets(team.stack).values())
    assert corpus_server.served >= 2 and corpus_server.refused == 0  # the token was sent, and taken
    found: dict[str, list[str]] = {}

    def search(where: str, blob: bytes | str) -> None:
        if names := leaks(blob, planted):
            found[where] = names

    # every file of the three clones (DVC's cache, .dvc/tmp, .git), git's objects, the origin
    for user, repo in lab.repos.items():
        files = sorted(repo.rglob("*"))
        assert repo / "dvc.lock" in files and any(".dvc/cache/files" in str(f) for f in files)
        found |= leaks_in_files(files, planted)
        search(f"{user}'s git objects", git_objects(repo))
    found |= leaks_in_files(sorted(origin.rglob("*")), planted)
    search("the origin's git objects", git_objects(origin))
    assert TOKEN_ENV not in (lab.repos["alice"] / "dvc.lock").read_text()

    # the DVC remote and MLflow's artifact store (both S3 buckets), and moto's recording of them
    for bucket in (DVC_BUCKET, ARTIFACT_BUCKET):
        objects = bucket_objects(team.stack, bucket)
        assert objects, f"bucket {bucket} is empty: nothing was pushed or logged"
        for key, body in objects.items():
            search(f"s3://{bucket}/{key}", body)
    found |= leaks_in_files([team.paths.recording], planted)

    # MLflow's params, tags, names and inputs of every run of the lab's experiment
    client = mlflow_client(lab.logins["carol"])
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) >= 2  # one per experiment (evaluate@rnn continues train@rnn's run)
    for run in runs:
        record = json.dumps({"params": run.data.params, "tags": run.data.tags,
                             "name": run.info.run_name, "artifact_uri": run.info.artifact_uri,
                             "inputs": [(d.dataset.name, d.dataset.source, d.dataset.profile)
                                        for d in run.inputs.dataset_inputs]})
        search(f"MLflow run {run.info.run_id}", record)

    # what every command printed, the stack's logs, and `ps` while the stages ran
    assert any("Running stage 'download'" in out for out in OUTPUTS)
    search("a command's output", "\n".join(OUTPUTS))
    logs = sorted(team.paths.logs.glob("*.log"))
    assert {p.name for p in logs} >= {"mlflow.log", "postgres.log", "s3.log"}
    found |= leaks_in_files(logs, planted)
    assert any("stages.train" in line for line in lab.ps.seen), f"{lab.ps.samples} samples"
    assert any("mlflow" in line and "server" in line for line in lab.ps.seen)
    for line in lab.ps.seen:
        search(f"ps: {line[:200]}", line)

    assert found == {}


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
