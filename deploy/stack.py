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
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from rnnlab.errors import UserError, run_main

ARTIFACT_BUCKET = "mlflow-artifacts"
DVC_BUCKET = "dvc-remote"
REMOTE = "team"                 # the DVC remote's name
ADMIN = "admin"
DEFAULT_PORTS = {"postgres": 15432, "s3": 19000, "mlflow": 5050}
START_SECONDS = 60              # give up on a service that does not answer by then
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1"}


def say(msg: str) -> None:
    print(f"team: {msg}", file=sys.stderr, flush=True)


@dataclass
class Stack:
    """The stack's settings, made once by the first `up` and kept in `.team/stack.json`."""

    postgres_port: int
    s3_port: int
    mlflow_port: int
    user: str                   # the member whose credentials `up` prints
    user_password: str
    admin_password: str
    db_password: str            # role `mlflow` of PostgreSQL
    s3_key: str
    s3_secret: str
    flask_secret: str           # signs the auth app's CSRF tokens

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def remote_url(self) -> str:
        return f"s3://{DVC_BUCKET}/rnnlab"

    def db_uri(self, database: str) -> str:
        """No password in the URI (it would show in `ps` and in logs): libpq reads it from
        PGPASSFILE (`.team/pgpass`)."""
        return f"postgresql+psycopg://mlflow@127.0.0.1:{self.postgres_port}/{database}"


class Paths:
    def __init__(self, root: Path):
        self.root = root
        self.pg = root / "postgres"             # the database cluster
        self.run = root / "run"                 # pid files and PostgreSQL's socket
        self.s3 = root / "s3"
        self.recording = self.s3 / "recording.jsonl"
        self.logs = root / "logs"
        self.config = root / "stack.json"
        self.pgpass = root / "pgpass"
        self.auth_ini = root / "basic_auth.ini"
        self.env = root / "env"

    def pid(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


PROJECT = Path(__file__).resolve().parents[1]


def team_dir() -> Path:
    """TEAM_DIR, else `.team/` in this checkout."""
    return Path(os.environ.get("TEAM_DIR") or PROJECT / ".team").resolve()


def write_private(path: Path, text: str) -> None:
    """A file only its owner can read (it holds secrets), written whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_port(name: str, default: int) -> int:
    """The default port, or a free one if another program holds it (kept in stack.json)."""
    if not port_answers(default):
        return default
    port = free_port()
    say(f"port {default} is taken; {name} gets port {port}")
    return port


def load_stack(paths: Paths, user: str | None = None) -> Stack:
    """The stack's settings: read, or made with fresh secrets and free ports on first use."""
    if paths.config.exists():
        return Stack(**json.loads(paths.config.read_text()))
    ports = {k: int(os.environ.get(f"TEAM_{k.upper()}_PORT") or pick_port(k, v))
             for k, v in DEFAULT_PORTS.items()}
    stack = Stack(postgres_port=ports["postgres"], s3_port=ports["s3"], mlflow_port=ports["mlflow"],
                  user=user or "researcher", user_password=secrets.token_urlsafe(18),
                  admin_password=secrets.token_urlsafe(18), db_password=secrets.token_urlsafe(18),
                  s3_key="team" + secrets.token_hex(8), s3_secret=secrets.token_urlsafe(30),
                  flask_secret=secrets.token_hex(32))
    paths.root.mkdir(parents=True, exist_ok=True)
    write_private(paths.config, json.dumps(asdict(stack), indent=2) + "\n")
    return stack


# --- the programs and their flags (deploy/docker-compose.yml runs the same) ---------------------

def mlflow_server_args(stack: Stack) -> list[str]:
    """`mlflow server`'s arguments. The compose file's `mlflow` service passes the same flags."""
    return ["server", "--app-name", "basic-auth",
            "--backend-store-uri", stack.db_uri("mlflow"),
            "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}",
            "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(stack.mlflow_port), "--workers", "1"]


def auth_ini(stack: Stack) -> str:
    """MLflow's basic-auth configuration (MLFLOW_AUTH_CONFIG_PATH): users and permissions in
    PostgreSQL; anyone logged in may read, only an experiment's creator (or a grant) may change it."""
    return "\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = {stack.db_uri('mlflow_auth')}",
        f"admin_username = {ADMIN}",
        f"admin_password = {stack.admin_password}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        # A password check (a slow hash, on purpose) per request made each call take ~0.5 s on
        # 2 CPUs; a checked login is trusted for 60 s (a change through the API applies at once).
        "auth_cache_ttl_seconds = 60",
        "",
    ])


def server_env(stack: Stack, paths: Paths) -> dict[str, str]:
    return {**os.environ, **QUIET,
            "MLFLOW_AUTH_CONFIG_PATH": str(paths.auth_ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": stack.flask_secret,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint,
            "AWS_ACCESS_KEY_ID": stack.s3_key, "AWS_SECRET_ACCESS_KEY": stack.s3_secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "PGPASSFILE": str(paths.pgpass)}


def client_env(stack: Stack, user: str, password: str) -> dict[str, str]:
    """What a client machine exports: MLflow's URI and this user's login, and the S3 endpoint and
    keys for the DVC remote (MLflow's artifacts go through the server and need no S3 keys)."""
    return {"MLFLOW_TRACKING_URI": stack.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password,
            "AWS_ENDPOINT_URL": stack.s3_endpoint,
            "AWS_ACCESS_KEY_ID": stack.s3_key, "AWS_SECRET_ACCESS_KEY": stack.s3_secret,
            "AWS_DEFAULT_REGION": "us-east-1"}


def export_lines(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


# --- processes ---------------------------------------------------------------------------------

def alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, IndexError):
        return None
    except PermissionError:  # alive, but another user's (PostgreSQL run as `postgres`)
        return pid


def port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def claim_port(name: str, port: int, ours: bool) -> bool:
    """Whether our `name` already runs on `port` (True) or it is free (False); a port held by
    another program is an error naming the setting that moves ours."""
    if not port_answers(port):
        return False
    if ours:
        return True
    raise UserError(f"port {port} (for {name}) is in use by another program, perhaps the team "
                    f"stack of another clone; stop it, or give this stack other ports: delete "
                    f"{team_dir() / 'stack.json'} and run again with TEAM_{name.upper()}_PORT=<port> "
                    "(TEAM_POSTGRES_PORT, TEAM_S3_PORT, TEAM_MLFLOW_PORT)")


def wait_for(what: str, ready, log: Path, pidfile: Path | None = None,
             seconds: float = START_SECONDS) -> None:
    """Wait until `ready()`; a server that exits or takes longer than `seconds` is an error
    quoting the end of its log."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return
        if pidfile and not alive(pidfile):
            problem = "exited"
            break
        time.sleep(0.2)
    else:
        problem = f"did not answer within {seconds} s"
    tail = log.read_text(errors="replace").splitlines()[-12:] if log.exists() else []
    raise UserError("\n".join([f"{what} {problem}; the end of {log}:",
                               *("  " + line for line in tail)]))


def spawn(name: str, cmd: list[str], env: dict[str, str], paths: Paths) -> None:
    """Start a server in its own session, output to .team/logs/<name>.log, pid in .team/run."""
    with open(paths.log(name), "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd=paths.root)
    paths.pid(name).write_text(f"{proc.pid}\n")


def stop(name: str, paths: Paths, seconds: float = 15) -> bool:
    """SIGTERM the server's process group, then SIGKILL what is left after `seconds`."""
    pid = alive(paths.pid(name))
    if pid is None:
        paths.pid(name).unlink(missing_ok=True)
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and alive(paths.pid(name)):
        time.sleep(0.1)
    if alive(paths.pid(name)):
        os.killpg(pid, signal.SIGKILL)
    paths.pid(name).unlink(missing_ok=True)
    return True


# --- PostgreSQL --------------------------------------------------------------------------------

def pg_bin() -> Path:
    """The folder of PostgreSQL's server programs: TEAM_PG_BIN, else Debian's newest, else PATH."""
    if os.environ.get("TEAM_PG_BIN"):
        return Path(os.environ["TEAM_PG_BIN"])
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb") or shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise UserError("PostgreSQL's server programs (initdb, pg_ctl) were not found: install them "
                    "(Debian: apt-get install postgresql) or set TEAM_PG_BIN to their folder")


def as_db_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def pg_owner_ids() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise UserError("running as root, and there is no `postgres` user to run PostgreSQL as; "
                        "run `make team-up` as an ordinary user") from None
    return entry.pw_uid, entry.pw_gid


def start_postgres(stack: Stack, paths: Paths) -> None:
    bindir = pg_bin()
    owner = pg_owner_ids()
    for folder in (paths.pg, paths.run):
        folder.mkdir(parents=True, exist_ok=True)
        if owner:
            os.chown(folder, *owner)
    paths.pg.chmod(0o700)
    quiet = {**os.environ, "LC_ALL": "C.UTF-8"}
    if not (paths.pg / "PG_VERSION").exists():
        say(f"creating a PostgreSQL cluster in {paths.pg}")
        pwfile = paths.run / "initdb.pw"   # the superuser's password, for initdb only
        write_private(pwfile, stack.db_password + "\n")
        if owner:
            os.chown(pwfile, *owner)
        try:
            subprocess.run(as_db_owner([str(bindir / "initdb"), "-D", str(paths.pg), "-U", "postgres",
                                        "--auth-local=peer" if owner else "--auth-local=trust",
                                        "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                                        "-E", "UTF8"]),
                           check=True, capture_output=True, env=quiet)
        except subprocess.CalledProcessError as err:
            raise UserError(f"initdb failed: {err.stderr.decode(errors='replace').strip()}") from None
        finally:
            pwfile.unlink(missing_ok=True)
    if not claim_port("postgres", stack.postgres_port, (paths.pg / "postmaster.pid").exists()):
        options = f"-p {stack.postgres_port} -k {paths.run} -c listen_addresses=127.0.0.1"
        log = paths.log("postgres")
        log.touch()
        if owner:
            os.chown(log, *owner)
        result = subprocess.run(as_db_owner([str(bindir / "pg_ctl"), "-D", str(paths.pg), "-l", str(log),
                                             "-o", options, "-w", "-t", str(START_SECONDS), "start"]),
                                capture_output=True, env=quiet)
        if result.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-10:]
            raise UserError("\n".join([f"PostgreSQL did not start on port {stack.postgres_port}:",
                                       *("  " + line for line in tail)]))
    write_private(paths.pgpass, f"127.0.0.1:{stack.postgres_port}:*:mlflow:{stack.db_password}\n")
    ensure_databases(stack, paths, bindir)


def psql(stack: Stack, paths: Paths, bindir: Path, sql: str, database: str = "postgres") -> str:
    cmd = [str(bindir / "psql"), "-h", str(paths.run), "-p", str(stack.postgres_port), "-U", "postgres",
           "-d", database, "-tAc", sql]
    env = {**os.environ, "PGPASSWORD": stack.db_password}
    result = subprocess.run(as_db_owner(cmd), capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise UserError(f"PostgreSQL: {result.stderr.strip()}")
    return result.stdout.strip()


def ensure_databases(stack: Stack, paths: Paths, bindir: Path) -> None:
    """Role `mlflow` (password from stack.json) owning databases `mlflow` and `mlflow_auth`."""
    if not psql(stack, paths, bindir, "SELECT 1 FROM pg_roles WHERE rolname = 'mlflow'"):
        psql(stack, paths, bindir, f"CREATE ROLE mlflow LOGIN PASSWORD '{stack.db_password}'")
    for db in ("mlflow", "mlflow_auth"):
        if not psql(stack, paths, bindir, f"SELECT 1 FROM pg_database WHERE datname = '{db}'"):
            psql(stack, paths, bindir, f"CREATE DATABASE {db} OWNER mlflow")


def stop_postgres(paths: Paths) -> bool:
    if not (paths.pg / "postmaster.pid").exists():
        return False
    subprocess.run(as_db_owner([str(pg_bin() / "pg_ctl"), "-D", str(paths.pg), "-m", "fast", "-w",
                                "stop"]), capture_output=True)
    return True


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

def health(stack: Stack) -> bool:
    try:
        return requests.get(f"{stack.tracking_uri}/health", timeout=2).ok
    except requests.RequestException:
        return False


def start_mlflow(stack: Stack, paths: Paths) -> None:
    write_private(paths.auth_ini, auth_ini(stack))
    if claim_port("mlflow", stack.mlflow_port, alive(paths.pid("mlflow")) is not None):
        return
    mlflow = Path(sys.executable).with_name("mlflow")
    spawn("mlflow", [str(mlflow), *mlflow_server_args(stack)], server_env(stack, paths), paths)
    wait_for(f"the MLflow server (port {stack.mlflow_port})", lambda: health(stack), paths.log("mlflow"),
             paths.pid("mlflow"), seconds=120)


def api(stack: Stack, method: str, path: str, auth: tuple[str, str], version: str = "2.0",
        **kw) -> requests.Response:
    return requests.request(method, f"{stack.tracking_uri}/api/{version}/mlflow/{path}", auth=auth,
                            timeout=30, **kw)


def add_user(stack: Stack, name: str, password: str) -> bool:
    """Create user `name` unless it exists; True when created."""
    admin = (ADMIN, stack.admin_password)
    if api(stack, "GET", "users/get", admin, params={"username": name}).ok:
        return False
    r = api(stack, "POST", "users/create", admin, json={"username": name, "password": password})
    if not r.ok:
        raise UserError(f"could not create MLflow user {name!r}: {r.status_code} {r.text[:200]}")
    return True


def grant(stack: Stack, name: str, experiment: str, permission: str) -> None:
    """Give user `name` PERMISSION on EXPERIMENT (created, owned by the admin, if it is new)."""
    admin = (ADMIN, stack.admin_password)
    r = api(stack, "GET", "experiments/get-by-name", admin, params={"experiment_name": experiment})
    if r.status_code == 404:
        r = api(stack, "POST", "experiments/create", admin, json={"name": experiment})
        r.raise_for_status()
        exp_id = r.json()["experiment_id"]
    else:
        r.raise_for_status()
        exp_id = r.json()["experiment"]["experiment_id"]
    body = {"username": name, "resource_type": "experiment", "resource_id": exp_id,
            "permission": permission}
    r = api(stack, "POST", "users/permissions/grant", admin, version="3.0", json=body)
    if r.status_code == 400 and "RESOURCE_ALREADY_EXISTS" in r.text:  # another: replace it
        api(stack, "POST", "users/permissions/revoke", admin, version="3.0",
            json={k: v for k, v in body.items() if k != "permission"})
        r = api(stack, "POST", "users/permissions/grant", admin, version="3.0", json=body)
    if not r.ok:
        raise UserError(f"could not grant {permission} on {experiment!r} to {name!r}: "
                        f"{r.status_code} {r.text[:200]}")


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
