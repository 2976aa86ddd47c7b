"""The local team stack: PostgreSQL, an S3 server and an MLflow tracking server with basic-auth.

    python -m deploy.stack up | down | env | status   # start, stop (data kept), exports, ports
    python -m deploy.stack user [--service] NAME      # add a member (admin only) or a service
    python -m deploy.stack grant NAME EXPERIMENT PERMISSION   # READ, EDIT, MANAGE, NO_PERMISSIONS

It runs the programs of deploy/docker-compose.yml with the same flags (checked by
tests/deploy/test_compose.py) as local processes on 127.0.0.1: PostgreSQL (deploy/postgres.py),
moto's S3 server for MinIO (deploy/s3_server.py), `mlflow server --app-name basic-auth`
(deploy/mlflow_auth.py). A member is a person (MLflow login, an S3 key for the DVC remote only,
a PostgreSQL role owning their studies), a service the same for a cluster's workers, without
studies. All state lives in the git-ignored `.team/` (`TEAM_DIR` elsewhere): `down` then `up`
keeps every run, user and object. Stdout carries only lines a shell can `eval`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from deploy.mlflow_auth import add_user, grant, health, start_mlflow
from deploy.postgres import ensure_user, start_postgres, stop_postgres
from deploy.processes import alive, claim_port, spawn, stop, wait_for
from deploy.settings import (
    ARTIFACT_BUCKET,
    DVC_BUCKET,
    QUIET,
    REMOTE,
    Paths,
    Stack,
    check_user_name,
    load_stack,
    pg_role,
    port_answers,
    read_users,
    s3_key,
    say,
    team_dir,
    write_private,
    write_users,
)
from rnnlab.errors import UserError, run_main

# --- the programs and their flags (deploy/docker-compose.yml runs the same) ---------------------


@dataclass(frozen=True)
class Login:
    """One user's secrets, as `up` or `user` makes them (printed once; the first member's are
    kept in stack.json for `env`)."""

    name: str
    kind: str                 # member or service
    mlflow_password: str
    pg_password: str
    s3_key: str
    s3_secret: str

    @classmethod
    def new(cls, name: str, kind: str) -> "Login":
        return cls(name, kind, secrets.token_urlsafe(18), secrets.token_urlsafe(18), s3_key(),
                   secrets.token_urlsafe(30))


def first_member(stack: Stack) -> Login:
    return Login(stack.user, "member", stack.user_password, stack.user_pg_password,
                 stack.user_s3_key, stack.user_s3_secret)


def client_env(stack: Stack, login: Login) -> dict[str, str]:
    """What a client machine exports: MLflow's URI and this user's login, the S3 endpoint and
    this user's key (the DVC remote's bucket only; MLflow's artifacts go through the server),
    this user's PostgreSQL role, and for a member where `rnnlab tune` keeps their studies."""
    env = {"MLFLOW_TRACKING_URI": stack.tracking_uri,
           "MLFLOW_TRACKING_USERNAME": login.name, "MLFLOW_TRACKING_PASSWORD": login.mlflow_password,
           "AWS_ENDPOINT_URL": stack.s3_endpoint,
           "AWS_ACCESS_KEY_ID": login.s3_key, "AWS_SECRET_ACCESS_KEY": login.s3_secret,
           "AWS_DEFAULT_REGION": "us-east-1",
           "PGUSER": pg_role(login.name), "PGPASSWORD": login.pg_password}
    if login.kind == "member":
        env["RNNLAB_OPTUNA_STORAGE"] = stack.member_storage(login.name)
    return env


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
    """The S3 server with the MLflow server's own user (both buckets) and every user's key (the
    DVC remote's bucket); it replays its recording before it says it is ready."""
    paths.s3.mkdir(parents=True, exist_ok=True)
    users = read_users(paths)
    users["mlflow"] = {"kind": "server", "key": stack.s3_key, "secret": stack.s3_secret, "buckets": "*"}
    write_users(paths, users)
    if claim_port("s3", stack.s3_port, alive(paths.pid("s3")) is not None):
        return
    env = {**os.environ, **QUIET, "MOTO_ENABLE_RECORDING": "true",
           "MOTO_RECORDER_FILEPATH": str(paths.recording), "TEAM_S3_USERS": str(paths.users),
           "TEAM_S3_BUCKETS": f"{ARTIFACT_BUCKET},{DVC_BUCKET}"}
    server = Path(__file__).with_name("s3_server.py")
    if paths.recording.exists() and paths.recording.stat().st_size:
        say(f"restoring the S3 objects from {paths.recording}")
    spawn("s3", [sys.executable, str(server), "-H", "127.0.0.1", "-p", str(stack.s3_port)], env, paths)
    wait_for(f"the S3 server (port {stack.s3_port})", lambda: s3_ready(stack),
             paths.log("s3"), paths.pid("s3"), seconds=600)


def s3_ready(stack: Stack) -> bool:
    try:
        return requests.get(f"{stack.s3_endpoint}/team-ready", timeout=2).ok
    except requests.RequestException:
        return False


def add_login(stack: Stack, paths: Paths, login: Login) -> bool:
    """`login` everywhere the stack keeps users: its S3 key (users.json, which the S3 server
    follows), its PostgreSQL role (and grants), its MLflow user. False if the name is taken."""
    users = read_users(paths)
    if login.name in users and users[login.name]["key"] != login.s3_key:
        return False
    users[login.name] = {"kind": login.kind, "key": login.s3_key, "secret": login.s3_secret,
                         "buckets": [DVC_BUCKET]}
    ensure_user(stack, paths, login.name, login.kind, login.pg_password,
                {n: u["kind"] for n, u in users.items() if n != login.name})
    write_users(paths, users)
    add_user(stack, login.name, login.mlflow_password)
    return True


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
    if user is not None:
        check_user_name(user)
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
    add_login(stack, paths, first_member(stack))
    say(f"MLflow (basic-auth) on {stack.tracking_uri}, member {stack.user!r}")
    remote = add_remote(stack)
    env = client_env(stack, first_member(stack))
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
    p_user = sub.add_parser("user", help="add a member (or a service); print their environment")
    p_user.add_argument("name")
    p_user.add_argument("--service", action="store_true", help="a login for a cluster's workers: "
                        "no studies of its own, may report to every member's")
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
            sys.stdout.write(export_lines(client_env(stack, first_member(stack))))
        elif args.command == "user":
            check_user_name(args.name)
            require_up(stack)
            login = Login.new(args.name, "service" if args.service else "member")
            if args.name in read_users(paths) or not add_login(stack, paths, login):
                raise UserError(f"user {args.name!r} exists already")
            sys.stdout.write(export_lines(client_env(stack, login)))
        elif args.command == "grant":
            require_up(stack)
            grant(stack, args.name, args.experiment, args.permission)
            say(f"{args.name} has {args.permission} on experiment {args.experiment!r}")


if __name__ == "__main__":
    run_main(main)
