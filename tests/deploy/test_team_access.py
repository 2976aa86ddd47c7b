"""Who may do what on the team's MLflow server, proved against the real stack.

One `python -m deploy.stack up` (PostgreSQL, moto's S3 server, `mlflow server --app-name
basic-auth` with default_permission READ; deploy/throwaway.py) is shared by every slow test here,
on free ports in a temporary folder. They show that:

1. (what MLflow's basic-auth itself does, 401 for a bad login and 403 for each kind of change, is
   MLflow's to test: one case each stands here, for what this project adds)
2. `python -m deploy.stack grant`: a second user (bob) can read the member's experiment but not
   write to it (403); granted EDIT he can, but deleting a run still takes MANAGE, which a second
   grant gives him;
3. a pipeline stage (`python -m stages.train`) that is refused prints exactly one `error:` line,
   no traceback, and exits 2: a wrong password names 401, the server and
   MLFLOW_TRACKING_PASSWORD; bob writing into the member's experiment names 403, the experiment
   and the `deploy.stack grant` command that fixes it;
4. no password leaks: after the member's real training run (its MLFLOW_TRACKING_URI even carries
   the password as userinfo), neither the member's, bob's nor the admin's password is in any file
   of the small project (params, outputs, the stage's captured output), in the run's params, tags,
   inputs or artifacts, in the files git tracks, or in the stack's server logs; the printed URIs
   (ours and MLflow's "View run at") carry no login.

Fast unit tests check `refusal_error` without a server (tests/test_redact.py: the masking).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from deploy.throwaway import TeamStack, shell_env, stack_secrets
from rnnlab.tracking.store import refusal_error
from tests.conftest import shipped_params
from tests.deploy.leaks import leaks, leaks_in_files
from tests.stagerun import in_process

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "team-access"          # the member's training runs go here (tracking.experiment)
VARIANT = "rnn"
WRONG = "not-the-password"


# ---------------------------------------------------------------------------------------------
# helpers


def api(team: TeamStack, method: str, path: str, auth: tuple[str, str] | None,
        **kw) -> requests.Response:
    """One REST call to the tracking server, as `auth` (user, password) or anonymously."""
    return requests.request(method, f"{team.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/{path}",
                            auth=auth, timeout=30, **kw)


def login(env: dict[str, str]) -> tuple[str, str]:
    return env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]


def admin(team: TeamStack) -> tuple[str, str]:
    return "admin", team.stack.admin_password


def member_experiment(team: TeamStack, name: str) -> tuple[str, str]:
    """An experiment the member creates, with one run in it: (experiment id, run id)."""
    member = login(team.env)
    r = api(team, "POST", "experiments/create", member, json={"name": name})
    assert r.ok, r.text
    exp_id = r.json()["experiment_id"]
    r = api(team, "POST", "runs/create", member,
            json={"experiment_id": exp_id, "start_time": int(time.time() * 1000)})
    assert r.ok, r.text
    return exp_id, r.json()["run"]["info"]["run_id"]


def changes(exp_id: str, run_id: str, name: str) -> dict[str, tuple[str, dict]]:
    """Every way of changing an experiment or its runs that the tests try, as REST calls."""
    return {
        "rename experiment": ("experiments/update", {"experiment_id": exp_id, "new_name": name + "-x"}),
        "delete experiment": ("experiments/delete", {"experiment_id": exp_id}),
        "set tag": ("runs/set-tag", {"run_id": run_id, "key": "by", "value": "bob"}),
        "log metric": ("runs/log-metric", {"run_id": run_id, "key": "loss", "value": 1.5,
                                           "timestamp": int(time.time() * 1000), "step": 0}),
        "update run": ("runs/update", {"run_id": run_id, "status": "FINISHED"}),
        "delete run": ("runs/delete", {"run_id": run_id}),
    }


def get_run(team: TeamStack, run_id: str) -> dict:
    r = api(team, "GET", "runs/get", admin(team), params={"run_id": run_id})
    assert r.ok, r.text
    return r.json()["run"]


def get_experiment(team: TeamStack, exp_id: str) -> dict:
    r = api(team, "GET", "experiments/get", admin(team), params={"experiment_id": exp_id})
    assert r.ok, r.text
    return r.json()["experiment"]


def stage_env(project: Path, tracking: dict[str, str]) -> dict[str, str]:
    """A stage's environment: no inherited MLflow, DVC or AWS settings; `tracking`'s on top."""
    return shell_env({}, PYTHONUNBUFFERED="1", DVC_ROOT=str(project),
                     PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                     **tracking)


def run_stage(project: Path, module: str, *args, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m stages.MODULE ARGS` in the small project's folder."""
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *map(str, args)], cwd=project,
                          env=env, capture_output=True, text=True, timeout=300)


def train(project: Path, out: str, env: dict[str, str], fresh_process: bool = True) -> subprocess.CompletedProcess:
    """The real train stage on the project's tokens, writing under project/OUT; its output is
    kept in project/OUT/stdout.txt and stderr.txt (files the leak test reads too). A fresh
    process, or this one's (tests/stagerun.py) where only the stage's own lines matter."""
    folder = project / out
    args = ("--params", "params.yaml", "--variant", VARIANT, "--data", "tokens", "--out", folder / "model",
            "--curves", folder / "curves.csv", "--work", folder / "work")
    proc = (run_stage(project, "train", *args, env=env) if fresh_process
            else in_process("train", *args, cwd=project, env=env))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stdout.txt").write_text(proc.stdout)
    (folder / "stderr.txt").write_text(proc.stderr)
    return proc


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def the_error(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a refused stage, checked: exit 2, no traceback, one line."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# ---------------------------------------------------------------------------------------------
# fixtures: one stack, one user bob, one small project, one tracked training of the member


@pytest.fixture(scope="module")
def bob(team) -> dict[str, str]:
    """A second user's environment; default_permission READ is all he has."""
    return team.user_env("bob")


@pytest.fixture(scope="module")
def secrets(team, bob) -> dict[str, str]:
    return {**stack_secrets(team.stack), "bob's password": bob["MLFLOW_TRACKING_PASSWORD"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A small project: params.yaml for a training of seconds (2000 characters, 8 hidden units,
    1 epoch, 1 thread, runs into experiment EXPERIMENT) and its tokens, made by the real download
    and tokenize stages."""
    folder = tmp_path_factory.mktemp("project")
    params = shipped_params({
        "data": {"corpus": "timemachine", "max_tokens": 2000},
        "tokenize": {"token": "char"},
        "train": {"num_steps": 8, "hidden_size": 8, "batch_size": 4, "epochs": 1, "device": "cpu",
                  "threads": 1},
        "variants": {VARIANT: {"cell": "rnn"}},
        "tracking": {"enabled": True, "experiment": EXPERIMENT, "patience": 0, "register": None},
    })
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = stage_env(folder, {})
    ok(run_stage(folder, "download", "--out", "raw", env=env))
    ok(run_stage(folder, "tokenize", "--raw", "raw", "--out", "tokens", env=env))
    return folder


@pytest.fixture(scope="module")
def member_run(team, project) -> tuple[subprocess.CompletedProcess, str]:
    """The member's training, tracked to the server: (the stage's result, the MLflow run id).
    MLFLOW_TRACKING_URI carries the login as userinfo as well, as some people set it."""
    user, password = login(team.env)
    uri = team.env["MLFLOW_TRACKING_URI"].replace("http://", f"http://{user}:{password}@")
    proc = train(project, "member", stage_env(project, {**team.env, "MLFLOW_TRACKING_URI": uri}))
    found = re.search(r"tracking: MLflow run (\w+) \(new\)", ok(proc))
    assert found, proc.stdout
    return proc, found.group(1)


# ---------------------------------------------------------------------------------------------
# 2. authorization: bob, the member's experiment, and `deploy.stack grant`


@pytest.mark.slow
def test_grant_gives_another_user_edit_then_manage_on_an_experiment(team, bob):
    name = "member-shared"
    exp_id, run_id = member_experiment(team, name)
    calls = changes(exp_id, run_id, name)

    def as_bob(what: str) -> int:
        path, body = calls[what]
        return api(team, "POST", path, login(bob), json=body).status_code

    assert api(team, "GET", "runs/get", login(bob), params={"run_id": run_id}).status_code == 200
    assert as_bob("set tag") == 403  # default_permission READ: he reads, he does not write
    assert "by" not in {t["key"] for t in get_run(team, run_id)["data"].get("tags", [])}

    team.cli("grant", "bob", name, "EDIT")
    assert as_bob("set tag") == 200
    assert {"key": "by", "value": "bob"} in get_run(team, run_id)["data"]["tags"]
    assert as_bob("delete run") == 403  # deleting takes MANAGE
    assert get_run(team, run_id)["info"]["lifecycle_stage"] == "active"

    team.cli("grant", "bob", name, "MANAGE")  # bob has EDIT already: the grant changes it
    assert as_bob("delete run") == 200
    assert get_run(team, run_id)["info"]["lifecycle_stage"] == "deleted"


# ---------------------------------------------------------------------------------------------
# 3. a refused stage: one line, no traceback, exit 2


@pytest.mark.slow
def test_a_stage_refused_its_login_says_401_and_what_to_set(team, project):
    env = {**team.env, "MLFLOW_TRACKING_PASSWORD": WRONG}
    error = the_error(train(project, "refused-401", stage_env(project, env), fresh_process=False))
    assert "401" in error and team.env["MLFLOW_TRACKING_URI"] in error
    assert "MLFLOW_TRACKING_USERNAME" in error and "MLFLOW_TRACKING_PASSWORD" in error
    assert f"user {team.env['MLFLOW_TRACKING_USERNAME']!r}" in error and WRONG not in error
    assert not (project / "refused-401" / "model").exists()  # refused before training


@pytest.mark.slow
def test_a_stage_writing_into_another_members_experiment_says_403_and_how_to_get_access(
        team, project, bob, member_run):
    error = the_error(train(project, "refused-403", stage_env(project, bob), fresh_process=False))
    assert "403" in error and team.env["MLFLOW_TRACKING_URI"] in error
    assert f"experiment {EXPERIMENT!r}" in error and "user 'bob'" in error
    assert f"python -m deploy.stack grant bob {EXPERIMENT} EDIT" in error
    assert "tracking.experiment" in error
    # bob left no run behind in the member's experiment
    exp = api(team, "GET", "experiments/get-by-name", admin(team),
              params={"experiment_name": EXPERIMENT}).json()["experiment"]
    runs = api(team, "POST", "runs/search", admin(team),
               json={"experiment_ids": [exp["experiment_id"]]}).json().get("runs", [])
    assert [r["info"]["run_id"] for r in runs] == [member_run[1]]


# ---------------------------------------------------------------------------------------------
# 4. no credential leaks


@pytest.mark.slow
def test_a_login_in_the_uri_is_taken_out_of_everything_printed(team, member_run):
    """The stage moves the URI's userinfo to MLFLOW_TRACKING_USERNAME / _PASSWORD, so neither its
    own line nor MLflow's "View run at ..." links carry it."""
    proc, run_id = member_run
    user, port = team.env["MLFLOW_TRACKING_USERNAME"], team.stack.mlflow_port
    assert f"run {run_id} (new) in experiment '{EXPERIMENT}' at http://127.0.0.1:{port}" in proc.stdout
    assert f"{user}:" not in proc.stdout + proc.stderr
    assert team.env["MLFLOW_TRACKING_PASSWORD"] not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_no_password_in_the_projects_files(project, member_run, secrets):
    files = sorted(project.rglob("*"))
    assert project / "member" / "model" / "best.pt" in files  # the training's outputs are there
    assert (project / "member" / "stdout.txt").read_text()   # and what it printed
    assert leaks_in_files(files, secrets) == {}


@pytest.mark.slow
def test_no_password_in_the_runs_params_tags_inputs_or_artifacts(team, member_run, secrets,
                                                                 tmp_path, monkeypatch):
    import mlflow

    for name, value in team.env.items():
        monkeypatch.setenv(name, value)
    client = mlflow.MlflowClient(team.env["MLFLOW_TRACKING_URI"])
    run = client.get_run(member_run[1])
    assert run.data.params and run.data.tags and run.inputs.dataset_inputs  # there is something to read
    record = {"params": run.data.params, "tags": run.data.tags, "run_name": run.info.run_name,
              "artifact_uri": run.info.artifact_uri,
              "inputs": [(d.dataset.name, d.dataset.source, d.dataset.profile, d.dataset.schema)
                         for d in run.inputs.dataset_inputs]}
    assert leaks(json.dumps(record), secrets) == []
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path),
                                                         tracking_uri=team.env["MLFLOW_TRACKING_URI"]))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert files
    assert leaks_in_files(files, secrets) == {}


@pytest.mark.slow
def test_no_password_in_the_repositorys_files_or_the_stacks_logs(team, member_run, secrets):
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / name for name in listed.split("\0") if name]
    assert ROOT / "deploy" / "stack.py" in files
    assert leaks_in_files(files, secrets) == {}
    logs = sorted(team.paths.logs.glob("*.log"))
    assert team.paths.log("mlflow") in logs
    assert leaks_in_files(logs, secrets) == {}


# ---------------------------------------------------------------------------------------------
# fast: what a refusal or a URI shows, without a server


def test_a_refusal_without_credentials_says_so(monkeypatch):
    class Refused(Exception):
        error_code = "UNAUTHENTICATED"

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    message = str(refusal_error(Refused(), "http://127.0.0.1:5050", "to read its experiments"))
    assert message.startswith("the MLflow server at http://127.0.0.1:5050 refused a request without "
                              "credentials (401 Unauthorized); set MLFLOW_TRACKING_USERNAME and "
                              "MLFLOW_TRACKING_PASSWORD")


@pytest.mark.parametrize("code, status", [("UNAUTHENTICATED", "401"), ("PERMISSION_DENIED", "403")])
def test_a_refusal_names_the_server_but_not_the_password_in_its_uri(monkeypatch, code, status):
    class Refused(Exception):
        error_code = code

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    message = str(refusal_error(Refused(), "http://ann:s3cret@127.0.0.1:5050", "to add a run",
                                "shared"))
    assert "http://ann:***@127.0.0.1:5050" in message and status in message
    assert "s3cret" not in message and len(message.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# what each login opens beyond MLflow: the S3 buckets, the databases of studies


def s3_as(team: TeamStack, env: dict[str, str]):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=team.stack.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                        config=Config(retries={"max_attempts": 1}))


@pytest.mark.slow  # the team stack
def test_a_members_s3_key_opens_the_dvc_remote_only(team, bob):
    """Each member's own key: the DVC remote's bucket to read and write; MLflow's artifact bucket
    (which only the server's key opens) neither to list, read, write nor delete; a key with a
    guessed secret nothing; moto's own API (which could turn the checks off) closed."""
    from botocore.exceptions import ClientError

    from deploy.settings import ARTIFACT_BUCKET, DVC_BUCKET
    from deploy.stack import s3_client

    server = s3_client(team.stack)
    server.put_object(Bucket=ARTIFACT_BUCKET, Key="access/probe", Body=b"mlflow's")
    assert team.env["AWS_ACCESS_KEY_ID"] != team.stack.s3_key != bob["AWS_ACCESS_KEY_ID"]
    for env in (team.env, bob):
        member = s3_as(team, env)
        member.put_object(Bucket=DVC_BUCKET, Key="access/probe", Body=b"dvc")
        assert member.get_object(Bucket=DVC_BUCKET, Key="access/probe")["Body"].read() == b"dvc"
        for refused in (lambda: member.list_objects_v2(Bucket=ARTIFACT_BUCKET),
                        lambda: member.get_object(Bucket=ARTIFACT_BUCKET, Key="access/probe"),
                        lambda: member.put_object(Bucket=ARTIFACT_BUCKET, Key="x", Body=b"x"),
                        lambda: member.delete_object(Bucket=ARTIFACT_BUCKET, Key="access/probe"),
                        lambda: member.list_buckets()):
            with pytest.raises(ClientError, match="AccessDenied"):
                refused()
    forged = s3_as(team, {"AWS_ACCESS_KEY_ID": team.stack.s3_key, "AWS_SECRET_ACCESS_KEY": WRONG})
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        forged.get_object(Bucket=ARTIFACT_BUCKET, Key="access/probe")
    assert requests.post(f"{team.stack.s3_endpoint}/moto-api/reset-auth", data="inf",
                         timeout=10).status_code == 403
    assert server.get_object(Bucket=ARTIFACT_BUCKET, Key="access/probe")["Body"].read() == b"mlflow's"
    # presigned URLs, as the MLflow server hands out for downloads: its own hold, no other does
    from botocore.config import Config

    def presigned(env: dict[str, str], key: str = "access/probe") -> str:
        import boto3

        client = boto3.client("s3", endpoint_url=team.stack.s3_endpoint, region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                              config=Config(signature_version="s3v4"))
        return client.generate_presigned_url("get_object", Params={"Bucket": ARTIFACT_BUCKET, "Key": key},
                                             ExpiresIn=60)

    own = {"AWS_ACCESS_KEY_ID": team.stack.s3_key, "AWS_SECRET_ACCESS_KEY": team.stack.s3_secret}
    assert requests.get(presigned(own), timeout=10).content == b"mlflow's"
    assert requests.get(presigned(own).replace("access/probe", "access/other"), timeout=10).status_code == 403
    for env in (team.env, {**own, "AWS_SECRET_ACCESS_KEY": WRONG}):
        assert requests.get(presigned(env), timeout=10).status_code == 403


def pg_connect(team: TeamStack, env: dict[str, str], database: str):
    import psycopg

    return psycopg.connect(host="127.0.0.1", port=team.stack.postgres_port, dbname=database,
                           user=env["PGUSER"], password=env["PGPASSWORD"], connect_timeout=10)


@pytest.mark.slow  # the team stack
def test_each_member_has_a_database_of_studies_only_they_and_the_workers_use(team, bob):
    """The member's study lives in their own database, which bob cannot even connect to; a
    service login (the workers') can, and reports to the member's trial, as a training does."""
    import optuna
    import psycopg

    storage = team.env["RNNLAB_OPTUNA_STORAGE"]
    assert "@" not in storage and storage != bob["RNNLAB_OPTUNA_STORAGE"]
    service = team.user_env("sweepworker", service=True)
    assert "RNNLAB_OPTUNA_STORAGE" not in service
    saved = {k: os.environ.get(k) for k in ("PGUSER", "PGPASSWORD")}
    try:
        os.environ.update(PGUSER=team.env["PGUSER"], PGPASSWORD=team.env["PGPASSWORD"])
        study = optuna.create_study(study_name="access", storage=storage, load_if_exists=True)
        number = study.ask().number
        os.environ.update(PGUSER=service["PGUSER"], PGPASSWORD=service["PGPASSWORD"])
        rdb = optuna.storages.RDBStorage(storage)
        theirs = optuna.load_study(study_name="access", storage=rdb)
        trial_id = rdb.get_trial_id_from_study_id_trial_number(rdb.get_study_id_from_name("access"), number)
        optuna.trial.Trial(theirs, trial_id).report(4.2, 1)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    database = storage.rsplit("/", 1)[1]
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        pg_connect(team, bob, database)
    for other in ("mlflow", "mlflow_auth"):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            pg_connect(team, team.env, other)
    with pg_connect(team, team.env, database) as db:  # the member's own connection
        (value,) = db.execute(
            "SELECT v.intermediate_value FROM trial_intermediate_values v JOIN trials t USING "
            "(trial_id) JOIN studies s USING (study_id) WHERE s.study_name = 'access' AND "
            "t.number = %s", (number,)).fetchone()
    assert value == 4.2


@pytest.mark.slow  # the team stack
def test_a_user_name_that_cannot_name_a_role_is_one_line(team):
    result = team.cli("user", "Bob Smith", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: user name 'Bob Smith':")
    assert len(result.stderr.splitlines()) == 1
