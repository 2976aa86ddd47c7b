"""What the team stack is: its folder (.team/ or TEAM_DIR), stack.json with its ports and generated
secrets (mode 0600), users.json with each user's S3 key (mode 0600), and the buckets and names it
uses."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

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
    optuna_password: str = ""   # unused since each member has a role of their own (stacks made before)
    user_pg_password: str = ""  # the member's PostgreSQL role (their studies: member_storage)
    user_s3_key: str = ""       # the member's S3 key: the DVC remote's bucket only
    user_s3_secret: str = ""

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def remote_url(self) -> str:
        return f"s3://{DVC_BUCKET}/rnnlab"

    def member_storage(self, name: str) -> str:
        """Member `name`'s studies of rnnlab tune (docs/cluster.md): their own database. No user
        in the URI: each side logs in as itself (PGUSER, PGPASSWORD), a worker with its service
        role, which may use every member's database."""
        return f"postgresql+psycopg://127.0.0.1:{self.postgres_port}/{study_database(name)}"

    def db_uri(self, database: str) -> str:
        """No password in the URI (it would show in `ps` and in logs): libpq reads it from
        PGPASSFILE (`.team/pgpass`)."""
        return f"postgresql+psycopg://mlflow@127.0.0.1:{self.postgres_port}/{database}"


USER_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def check_user_name(name: str) -> str:
    """A user name of the stack: it names an MLflow user, an S3 user and a PostgreSQL role."""
    from rnnlab.errors import UserError

    if not USER_NAME.fullmatch(name) or name in (ADMIN, "mlflow", "postgres", "optuna"):
        raise UserError(f"user name {name!r}: lower-case letters, digits and _, starting with a "
                        f"letter, at most 40; not {ADMIN}, mlflow, postgres or optuna")
    return name


def pg_role(name: str) -> str:
    """The PostgreSQL role of user `name`."""
    return f"rnnlab_{name}"


def study_database(name: str) -> str:
    """The database of member `name`'s studies, owned by their role."""
    return f"optuna_{name}"


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
        self.users = root / "users.json"        # each user's kind and S3 key (deploy/s3_server.py)

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


def load_stack(paths: Paths, user: str | None = None) -> Stack:
    """The stack's settings: read, or made with fresh secrets and free ports on first use."""
    if paths.config.exists():
        stack = Stack(**json.loads(paths.config.read_text()))
        if not stack.user_s3_key:  # a stack made before members had keys of their own
            stack.user_pg_password = secrets.token_urlsafe(18)
            stack.user_s3_key, stack.user_s3_secret = s3_key(), secrets.token_urlsafe(30)
            write_private(paths.config, json.dumps(asdict(stack), indent=2) + "\n")
        return stack
    ports = {k: int(os.environ.get(f"TEAM_{k.upper()}_PORT") or pick_port(k, v))
             for k, v in DEFAULT_PORTS.items()}
    stack = Stack(postgres_port=ports["postgres"], s3_port=ports["s3"], mlflow_port=ports["mlflow"],
                  user=user or "researcher", user_password=secrets.token_urlsafe(18),
                  admin_password=secrets.token_urlsafe(18), db_password=secrets.token_urlsafe(18),
                  s3_key="team" + secrets.token_hex(8), s3_secret=secrets.token_urlsafe(30),
                  flask_secret=secrets.token_hex(32), user_pg_password=secrets.token_urlsafe(18),
                  user_s3_key=s3_key(), user_s3_secret=secrets.token_urlsafe(30))
    paths.root.mkdir(parents=True, exist_ok=True)
    write_private(paths.config, json.dumps(asdict(stack), indent=2) + "\n")
    return stack


def s3_key() -> str:
    """A new S3 access key id (it names the key; the secret is apart)."""
    return "AKIA" + secrets.token_hex(8).upper()


def read_users(paths: Paths) -> dict[str, dict]:
    """users.json: {name: {kind: member|service|server, key, secret, buckets}}."""
    return json.loads(paths.users.read_text()) if paths.users.exists() else {}


def write_users(paths: Paths, users: dict[str, dict]) -> None:
    write_private(paths.users, json.dumps(users, indent=2, sort_keys=True) + "\n")


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


def port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
