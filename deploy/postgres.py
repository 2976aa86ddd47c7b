"""PostgreSQL for the stack: its own cluster under the stack's folder, run as an unprivileged
owner, with the databases MLflow needs (its store and its users and permissions), and a role per
user: a member's owns the database of their studies, which no other member may connect to; a
service's (the workers' login) is a member of every member's role, so that a trial's training
reports to its study whoever submitted it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from deploy.processes import claim_port
from deploy.settings import START_SECONDS, Paths, Stack, pg_role, say, study_database, write_private
from rnnlab.errors import UserError


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
    """Run `sql` as the superuser; its result rows. The statement goes through stdin, never the
    command line, where `ps` would show it to every user of the machine."""
    cmd = [str(bindir / "psql"), "-h", str(paths.run), "-p", str(stack.postgres_port), "-U", "postgres",
           "-d", database, "-tA", "-v", "ON_ERROR_STOP=1", "-f", "-"]
    env = {**os.environ, "PGPASSWORD": stack.db_password}
    result = subprocess.run(as_db_owner(cmd), input=sql, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise UserError(f"PostgreSQL: {result.stderr.strip()}")
    return result.stdout.strip()


def ensure_databases(stack: Stack, paths: Paths, bindir: Path) -> None:
    """Role `mlflow` (password from stack.json) owning databases `mlflow` and `mlflow_auth`,
    which no other role may connect to."""
    ensure_role(stack, paths, bindir, "mlflow", stack.db_password)
    for db in ("mlflow", "mlflow_auth"):
        ensure_database(stack, paths, bindir, db, "mlflow")


def ensure_role(stack: Stack, paths: Paths, bindir: Path, role: str, password: str) -> bool:
    """Role `role` with `password`, made if missing; True when made now."""
    if psql(stack, paths, bindir, f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'"):
        return False
    # the SCRAM verifier, not the password: the server, its log and psql never see that
    psql(stack, paths, bindir, f'CREATE ROLE "{role}" LOGIN PASSWORD \'{scram_verifier(password)}\'')
    return True


def ensure_database(stack: Stack, paths: Paths, bindir: Path, db: str, owner: str) -> None:
    """Database `db` owned by `owner`, made if missing; only its owner (and the owner's members)
    may connect."""
    if not psql(stack, paths, bindir, f"SELECT 1 FROM pg_database WHERE datname = '{db}'"):
        psql(stack, paths, bindir, f'CREATE DATABASE "{db}" OWNER "{owner}"')
    psql(stack, paths, bindir, f'REVOKE ALL ON DATABASE "{db}" FROM PUBLIC')


def ensure_user(stack: Stack, paths: Paths, name: str, kind: str, password: str,
                others: dict[str, str]) -> bool:
    """User `name`'s role: a member's owns the database of their studies and is granted to every
    service; a service's is granted every member's role. `others`: name -> kind of the users
    there are. True when the role was made now."""
    bindir = pg_bin()
    made = ensure_role(stack, paths, bindir, pg_role(name), password)
    if kind == "member":
        ensure_database(stack, paths, bindir, study_database(name), pg_role(name))
        pairs = [(name, other) for other, k in others.items() if k == "service"]
    else:
        pairs = [(other, name) for other, k in others.items() if k == "member"]
    for member, service in pairs:
        psql(stack, paths, bindir, f'GRANT "{pg_role(member)}" TO "{pg_role(service)}"')
    return made


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """What PostgreSQL stores for a SCRAM-SHA-256 password (RFC 5802/7677; what psql's
    \\password sends): a role created with it logs in with `password`, which never leaves here."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = [base64.b64encode(b).decode() for b in (salt, hashlib.sha256(client_key).digest(), server_key)]
    return f"SCRAM-SHA-256${iterations}:{b64[0]}${b64[1]}:{b64[2]}"


def stop_postgres(paths: Paths) -> bool:
    if not (paths.pg / "postmaster.pid").exists():
        return False
    subprocess.run(as_db_owner([str(pg_bin() / "pg_ctl"), "-D", str(paths.pg), "-m", "fast", "-w",
                                "stop"]), capture_output=True)
    return True
