"""The local team stack: PostgreSQL, an S3 server and an MLflow tracking server with basic-auth.

    python -m deploy.stack up             # start (or restart) everything; prints `export` lines
    python -m deploy.stack down           # stop everything; the data stays under .team/
    python -m deploy.stack env            # print the `export` lines again
    python -m deploy.stack status         # what runs, on which port
    python -m deploy.stack user NAME      # add a user (admin only); prints their `export` lines
    python -m deploy.stack grant NAME EXPERIMENT PERMISSION   # READ, EDIT, MANAGE or NO_PERMISSIONS

It runs the programs that deploy/docker-compose.yml runs, with the same flags (tests/test_compose.py
checks), on 127.0.0.1, as local processes:

- PostgreSQL (Debian's `postgresql` package; `TEAM_PG_BIN` names another bin folder): MLflow's
  backend store (database `mlflow`) and its users and permissions (`mlflow_auth`);
- moto's S3 server (the compose file: MinIO): bucket `mlflow-artifacts` for MLflow's artifacts,
  which the server proxies, and bucket `dvc-remote` for the DVC remote. moto keeps objects in
  memory, so every request that changes them is also appended to `.team/s3/recording.jsonl` and
  replayed at the next `up` (moto's own recorder);
- `mlflow server --app-name basic-auth`.

Everything lives in one git-ignored folder, `.team/` at the repository root (`TEAM_DIR` elsewhere):
the database files, the S3 recording, the logs, and `stack.json` with the ports and generated
secrets (mode 0600). `down` then `up` keeps every run, user and object. Stdout carries only lines a
shell can `eval`; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import requests

from deploy.mlflow_auth import add_user, grant, health, start_mlflow
from deploy.postgres import start_postgres, stop_postgres
from deploy.processes import alive, claim_port, spawn, stop, wait_for
from deploy.settings import (
    ARTIFACT_BUCKET,
    DVC_BUCKET,
    QUIET,
    REMOTE,
    Paths,
    Stack,
    load_stack,
    port_answers,
    say,
    team_dir,
    write_private,
)
from rnnlab.errors import UserError, run_main

# --- the programs and their flags (deploy/docker-compose.yml runs the same) ---------------------


def client_env(stack: Stack, user: str, password: str) -> dict[str, str]:
    """What a client machine exports: MLflow's URI and this user's login, the S3 endpoint and
    keys for the DVC remote (MLflow's artifacts go through the server and need no S3 keys), and
    where `rnnlab tune` keeps its studies (PGPASSWORD: the database role `optuna`'s)."""
    return {"MLFLOW_TRACKING_URI": stack.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password,
            "AWS_ENDPOINT_URL": stack.s3_endpoint,
            "AWS_ACCESS_KEY_ID": stack.s3_key, "AWS_SECRET_ACCESS_KEY": stack.s3_secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "RNNLAB_OPTUNA_STORAGE": stack.optuna_uri, "PGPASSWORD": stack.optuna_password}


def export_lines(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


# --- processes ---------------------------------------------------------------------------------


# --- PostgreSQL --------------------------------------------------------------------------------


# --- S3 ------------------------------------------------------------------------------------------

def s3_client(stack: Stack):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.s3_key,
                        aws_secret_access_key=stack.s3_secret, region_name="us-east-1",
                        config=Config(retries={"max_attempts": 2}))


def start_s3(stack: Stack, paths: Paths) -> None:
    paths.s3.mkdir(parents=True, exist_ok=True)
    if claim_port("s3", stack.s3_port, alive(paths.pid("s3")) is not None):
        return
    env = {**os.environ, **QUIET, "MOTO_ENABLE_RECORDING": "true",
           "MOTO_RECORDER_FILEPATH": str(paths.recording)}
    server = Path(__file__).with_name("s3_server.py")  # moto's, recording one request at a time
    spawn("s3", [sys.executable, str(server), "-H", "127.0.0.1", "-p", str(stack.s3_port)], env, paths)
    wait_for(f"the S3 server (port {stack.s3_port})", lambda: port_answers(stack.s3_port),
             paths.log("s3"), paths.pid("s3"))
    if paths.recording.exists() and paths.recording.stat().st_size:
        say(f"restoring the S3 objects from {paths.recording}")
        requests.post(f"{stack.s3_endpoint}/moto-api/recorder/replay-recording",
                      timeout=600).raise_for_status()
    client = s3_client(stack)
    have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in (ARTIFACT_BUCKET, DVC_BUCKET):
        if bucket not in have:
            client.create_bucket(Bucket=bucket)


# --- MLflow --------------------------------------------------------------------------------------


# --- DVC -----------------------------------------------------------------------------------------

def remote_commands(stack: Stack) -> list[list[str]]:
    """The DVC remote, in this clone's own config (.dvc/config.local, not committed): its
    endpoint is this machine's; the keys come from the environment, never from a file."""
    return [["dvc", "remote", "add", "--local", "--force", "--default", REMOTE, stack.remote_url],
            ["dvc", "remote", "modify", "--local", REMOTE, "endpointurl", stack.s3_endpoint]]


def add_remote(stack: Stack) -> list[str]:
    """Add the remote to the DVC repository of the working directory, if it is one."""
    root = Path.cwd()
    if not (root / ".dvc").is_dir():
        return []
    dvc = Path(sys.executable).with_name("dvc")
    done = []
    for cmd in remote_commands(stack):
        subprocess.run([str(dvc), *cmd[1:]], cwd=root, check=True, capture_output=True,
                       env={**os.environ, **QUIET})
        done.append(shlex.join(cmd))
    return done


# --- commands ------------------------------------------------------------------------------------

def up(user: str | None = None) -> None:
    paths = Paths(team_dir())
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.root.chmod(0o711)  # secrets and data: the owner's; PostgreSQL's user may pass through
    for folder in (paths.run, paths.s3, paths.logs):
        folder.mkdir(parents=True, exist_ok=True)
    stack = load_stack(paths, user)
    start = time.monotonic()
    start_postgres(stack, paths)
    say(f"PostgreSQL on 127.0.0.1:{stack.postgres_port} (data: {paths.pg})")
    start_s3(stack, paths)
    say(f"S3 (moto) on {stack.s3_endpoint}, buckets {ARTIFACT_BUCKET} and {DVC_BUCKET}")
    start_mlflow(stack, paths)
    add_user(stack, stack.user, stack.user_password)
    say(f"MLflow (basic-auth) on {stack.tracking_uri}, user {stack.user!r}")
    remote = add_remote(stack)
    env = client_env(stack, stack.user, stack.user_password)
    write_private(paths.env, export_lines(env))
    say(f"up in {time.monotonic() - start:.1f} s; logs in {paths.logs}; stop with `make team-down`")
    say(f"the environment is also in {paths.env}: eval \"$(make -s team-env)\"")
    sys.stdout.write(export_lines(env))
    for line in remote:
        print(f"# {line}")


def down() -> None:
    paths = Paths(team_dir())
    stopped = [name for name in ("mlflow", "s3") if stop(name, paths)]
    if stop_postgres(paths):
        stopped.append("postgres")
    say(f"stopped {', '.join(stopped) or 'nothing (nothing was running)'}; data kept in {paths.root}")


def status() -> None:
    paths = Paths(team_dir())
    if not paths.config.exists():
        say("no stack here yet: `make team-up` makes one")
        return
    stack = load_stack(paths)
    rows = [("postgres", stack.postgres_port, port_answers(stack.postgres_port)),
            ("s3", stack.s3_port, port_answers(stack.s3_port)),
            ("mlflow", stack.mlflow_port, health(stack))]
    for name, port, up_ in rows:
        print(f"{name:<9} 127.0.0.1:{port:<6} {'up' if up_ else 'down'}")


def require_up(stack: Stack) -> None:
    if not health(stack):
        raise UserError(f"the MLflow server at {stack.tracking_uri} does not answer: `make team-up`")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the stack; print the environment to export")
    p_up.add_argument("--user", help="the member user made on first start (default: researcher)")
    sub.add_parser("down", help="stop the stack, keeping its data")
    sub.add_parser("env", help="print the environment to export")
    sub.add_parser("status", help="what runs")
    p_user = sub.add_parser("user", help="add a user; print their environment")
    p_user.add_argument("name")
    p_grant = sub.add_parser("grant", help="give a user a permission on an experiment")
    p_grant.add_argument("name")
    p_grant.add_argument("experiment")
    p_grant.add_argument("permission", choices=["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"])
    args = parser.parse_args(argv)

    if args.command == "up":
        up(args.user)
    elif args.command == "down":
        down()
    elif args.command == "status":
        status()
    else:
        paths = Paths(team_dir())
        if not paths.config.exists():
            raise UserError(f"no stack in {paths.root}: run `make team-up` first")
        stack = load_stack(paths)
        if args.command == "env":
            sys.stdout.write(export_lines(client_env(stack, stack.user, stack.user_password)))
        elif args.command == "user":
            require_up(stack)
            password = secrets.token_urlsafe(18)
            if not add_user(stack, args.name, password):
                raise UserError(f"user {args.name!r} exists already")
            sys.stdout.write(export_lines(client_env(stack, args.name, password)))
        elif args.command == "grant":
            require_up(stack)
            grant(stack, args.name, args.experiment, args.permission)
            say(f"{args.name} has {args.permission} on experiment {args.experiment!r}")


if __name__ == "__main__":
    run_main(main)
