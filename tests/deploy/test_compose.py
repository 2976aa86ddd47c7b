"""deploy/docker-compose.yml mirrors deploy/stack.py (no Docker needed: the YAML is read, not run).

The compose file's `mlflow` service must run `mlflow server` with the flags of
`mlflow_server_args()`, the environment of `server_env()` and a basic-auth file with the keys of
`auth_ini()`; PostgreSQL must hold both databases, publish no port and give the superuser a
password of its own, MinIO both buckets with MLflow's own user; every secret must be a `${VAR}`
from deploy/.env. Only what a container must change may differ: the host (0.0.0.0), the
services' host names and ports. Each check is also run on a copy of the file with one drift put in,
and must fail there.
"""

from __future__ import annotations

import configparser
import copy
import os
import re
import shlex
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from deploy.mlflow_auth import auth_ini, mlflow_server_args, server_env
from deploy.settings import ARTIFACT_BUCKET, DVC_BUCKET, Paths, Stack

PROJECT = Path(__file__).resolve().parents[2]
COMPOSE = PROJECT / "deploy" / "docker-compose.yml"

# A stack with a distinct value in every field, so that each value of server_env() can be told apart.
SAMPLE = Stack(postgres_port=15432, s3_port=19000, mlflow_port=5050, user="researcher",
               user_password="sample-user-pw", admin_password="sample-admin-pw",
               db_password="sample-db-pw", s3_key="sample-s3-key", s3_secret="sample-s3-secret",
               flask_secret="sample-flask-secret", user_pg_password="sample-member-pg-pw",
               user_s3_key="sample-member-s3-key", user_s3_secret="sample-member-s3-secret")
SAMPLE_PATHS = Paths(Path("/sample/.team"))
SECRETS = {SAMPLE.user_password, SAMPLE.admin_password, SAMPLE.db_password, SAMPLE.s3_key,
           SAMPLE.s3_secret, SAMPLE.flask_secret, SAMPLE.user_pg_password, SAMPLE.user_s3_secret}

# `${VAR}` or `${VAR:?message}`; not `${VAR:-default}`, whose default would be a literal secret.
COMPOSE_REF = re.compile(r"\$\{[A-Z][A-Z0-9_]*(:\?[^}]*)?\}")
SHELL_REF = re.compile(r'"?\$\$\{?[A-Z][A-Z0-9_]*\}?"?')   # `$$VAR`: the container's shell expands it
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER", re.IGNORECASE)
# What the compose file's mlflow environment adds to server_env(), and why.
COMPOSE_ONLY_ENV = {
    "MLFLOW_DB_PASSWORD",           # the entrypoint writes PGPASSFILE from it (stack: .team/pgpass)
    "MLFLOW_SERVER_ALLOWED_HOSTS",  # the names clients use; the stack serves 127.0.0.1 only
}


def load() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def stack_env() -> dict[str, str]:
    """What server_env() sets beyond the caller's environment."""
    with mock.patch.dict(os.environ, clear=True):
        return server_env(SAMPLE, SAMPLE_PATHS)


def service(doc: dict, name: str) -> dict:
    assert name in doc["services"], f"no service {name!r} in {COMPOSE.name}"
    return doc["services"][name]


def container_ports(svc: dict) -> set[int]:
    """The container side of `ports:` ("${MLFLOW_PORT:-5000}:5000" -> 5000)."""
    return {int(str(p).rsplit(":", 1)[-1]) for p in svc.get("ports", [])}


def config_content(doc: dict, svc: dict, target_suffix: str) -> tuple[str, str]:
    """(target, content) of the inline config the service mounts at a path ending in the suffix."""
    found = [c for c in svc.get("configs", []) if c["target"].endswith(target_suffix)]
    assert len(found) == 1, f"one config mounted at *{target_suffix}, found {found}"
    return found[0]["target"], doc["configs"][found[0]["source"]]["content"]


def flags(args: list[str]) -> list[tuple[str, str | None]]:
    """`server --a x --b --c y` as [("server", None), ("--a", "x"), ("--b", None), ("--c", "y")]."""
    out: list[tuple[str, str | None]] = []
    for arg in args:
        if arg.startswith("--") or not out or out[-1][1] is not None or not out[-1][0].startswith("--"):
            out.append((arg, None))
        else:
            out[-1] = (out[-1][0], arg)
    return out


def db_parts(uri: str) -> tuple:
    """A database URI without what may differ (host, port)."""
    parts = urlsplit(uri)
    return parts.scheme, parts.username, parts.password, parts.path


def portable(args: list[str]) -> list[tuple[str, object]]:
    """The flags with the values a container must change blanked: host, port, the DB's host."""
    out = []
    for flag, value in flags(args):
        if flag in ("--host", "--port"):
            value = "<differs>"
        elif flag == "--backend-store-uri":
            value = db_parts(value)
        out.append((flag, value))
    return out


def mlflow_script(doc: dict) -> str:
    entry = service(doc, "mlflow")["entrypoint"]
    assert entry[:2] == ["/bin/sh", "-c"] and entry[3:] == ["mlflow"], entry
    return entry[2]


def assert_database_host(doc: dict, uri: str) -> None:
    parts = urlsplit(uri)
    assert parts.hostname == "postgres" and parts.port == 5432, uri
    assert service(doc, "postgres")["image"].startswith("postgres:")


# --- the checks ------------------------------------------------------------------------------------

def check_server_flags(doc: dict) -> None:
    mlflow = service(doc, "mlflow")
    command = mlflow["command"]
    assert portable(command) == portable(mlflow_server_args(SAMPLE))
    given = dict(flags(command))
    assert given["--host"] == "0.0.0.0"                       # reachable from outside the container
    assert int(given["--port"]) in container_ports(mlflow)
    assert f"127.0.0.1:{given['--port']}/health" in " ".join(mlflow["healthcheck"]["test"])
    assert_database_host(doc, given["--backend-store-uri"])
    assert 'exec mlflow "$$@"' in mlflow_script(doc)          # the command goes to `mlflow`


def check_server_env(doc: dict) -> None:
    env = service(doc, "mlflow")["environment"]
    expected = stack_env()
    assert set(env) == set(expected) | COMPOSE_ONLY_ENV
    for name, value in expected.items():
        if value in SECRETS:
            assert COMPOSE_REF.fullmatch(env[name]), f"{name}: {env[name]!r} is not a ${{VAR}}"
        elif str(SAMPLE_PATHS.root) not in value and "127.0.0.1" not in value:
            assert str(env[name]) == value, f"{name}: {env[name]!r}, deploy/stack.py: {value!r}"
    # the three that name a place: each must be the place the compose file has
    target, _ = config_content(doc, service(doc, "mlflow"), "basic_auth.ini")
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == target
    s3 = urlsplit(env["MLFLOW_S3_ENDPOINT_URL"])
    assert service(doc, s3.hostname)["image"].startswith("minio/minio")
    assert s3.port in container_ports(service(doc, s3.hostname))
    assert '> "$$PGPASSFILE"' in mlflow_script(doc)


def check_auth_ini(doc: dict) -> None:
    _, content = config_content(doc, service(doc, "mlflow"), "basic_auth.ini")
    given, expected = configparser.ConfigParser(), configparser.ConfigParser()
    given.read_string(content)
    expected.read_string(auth_ini(SAMPLE))
    assert given.sections() == expected.sections() == ["mlflow"]
    assert set(given["mlflow"]) == set(expected["mlflow"])
    for key, value in expected["mlflow"].items():
        if value in SECRETS:
            assert COMPOSE_REF.fullmatch(given["mlflow"][key]), f"{key} is not a ${{VAR}}"
        elif key == "database_uri":
            assert db_parts(given["mlflow"][key]) == db_parts(value)
            assert_database_host(doc, given["mlflow"][key])
        else:
            assert given["mlflow"][key] == value, key


def check_databases(doc: dict) -> None:
    """The init SQL makes the databases of MLflow's two URIs, each owned by its URI's user, and
    closed to every other role."""
    _, sql = config_content(doc, service(doc, "postgres"), ".sql")
    made = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", sql))
    for uri in (SAMPLE.db_uri("mlflow"), SAMPLE.db_uri("mlflow_auth")):
        parts = urlsplit(uri)
        database = parts.path.lstrip("/")
        assert made.get(database) == parts.username, (uri, made)
        assert re.search(rf"CREATE ROLE {parts.username} LOGIN PASSWORD '[^']*';", sql), sql
        assert f"REVOKE ALL ON DATABASE {database} FROM PUBLIC;" in sql


def check_private(doc: dict) -> None:
    """PostgreSQL publishes no port; the superuser's password is no other role's; MLflow's S3 key
    is not MinIO's root key."""
    postgres = service(doc, "postgres")
    assert not postgres.get("ports"), postgres.get("ports")
    _, sql = config_content(doc, postgres, ".sql")
    superuser = postgres["environment"]["POSTGRES_PASSWORD"]
    assert all(p != superuser for p in re.findall(r"PASSWORD '([^']*)'", sql)), sql
    root = service(doc, "minio")["environment"]["MINIO_ROOT_USER"]
    assert service(doc, "mlflow")["environment"]["AWS_ACCESS_KEY_ID"] != root


def check_buckets(doc: dict) -> None:
    script = " ".join(service(doc, "buckets")["command"])
    made = [w for line in script.split("&&") if "mc mb" in line for w in shlex.split(line)]
    for bucket in (ARTIFACT_BUCKET, DVC_BUCKET):
        assert any(w.endswith(f"/{bucket}") for w in made), f"bucket {bucket} is not made: {made}"
    assert dict(flags(service(doc, "mlflow")["command"]))["--artifacts-destination"] == \
        f"s3://{ARTIFACT_BUCKET}"


def check_no_literal_secret(doc: dict) -> None:
    """Every password or key is a ${VAR} (or, in a script, the shell's $$VAR)."""
    seen = 0
    for name, svc in doc["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                seen += 1
                assert COMPOSE_REF.fullmatch(str(value)), f"{name}: {key}={value!r} is literal"
        for script in [*svc.get("command", []), *svc.get("entrypoint", [])]:
            for user, password in re.findall(r"://([^/@\s:]+):([^/@\s]+)@", str(script)):
                seen += 1
                assert SHELL_REF.fullmatch(user) and SHELL_REF.fullmatch(password), script
    for name, config in doc["configs"].items():
        for line in config["content"].splitlines():
            m = re.search(r"(?:password|secret)\w*\s*=\s*(.*\S)|PASSWORD '([^']*)'", line, re.I)
            if m:
                seen += 1
                assert COMPOSE_REF.fullmatch(m.group(1) or m.group(2)), f"{name}: {line!r}"
    assert seen >= 10, f"only {seen} secrets found: is the file read right?"


def check_pins(doc: dict) -> None:
    """The packages the mlflow service installs are pinned as in pyproject.toml's `team` extra."""
    pyproject = (PROJECT / "pyproject.toml").read_text()
    pins = re.findall(r"'([\w.\-\[\]]+==[\w.]+)'", mlflow_script(doc))
    assert {p.split("==")[0] for p in pins} == {"mlflow[auth]", "psycopg[binary]", "boto3"}, pins
    for pin in pins:
        assert f'"{pin}"' in pyproject, f"{pin} is not pyproject.toml's pin"
    mlflow = re.search(r'"mlflow==([\w.]+)"', pyproject).group(1)
    assert service(doc, "mlflow")["image"].endswith(f":v{mlflow}")


def check_volumes(doc: dict) -> None:
    assert "postgres-data:/var/lib/postgresql/data" in service(doc, "postgres")["volumes"]
    minio = service(doc, "minio")
    data = minio["command"][minio["command"].index("server") + 1]
    assert f"minio-data:{data}" in minio.get("volumes", [])
    assert {"postgres-data", "minio-data"} <= set(doc["volumes"])


CHECKS = [check_server_flags, check_server_env, check_auth_ini, check_databases, check_private,
          check_buckets, check_no_literal_secret, check_pins, check_volumes]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_compose_mirrors_the_stack(check):
    check(load())


# --- each check fails on a drift ----------------------------------------------------------------------

def mlflow_of(doc: dict) -> dict:
    return doc["services"]["mlflow"]


def drop(items: list, value) -> None:
    items.remove(value)


def set_flag(doc: dict, flag: str, value: str) -> None:
    command = mlflow_of(doc)["command"]
    command[command.index(flag) + 1] = value


def edit_config(doc: dict, name: str, old: str, new: str) -> None:
    assert old in doc["configs"][name]["content"]
    doc["configs"][name]["content"] = doc["configs"][name]["content"].replace(old, new)


def edit_script(items: list, old: str, new: str) -> None:
    i = next(i for i, s in enumerate(items) if old in s)
    items[i] = items[i].replace(old, new)


DRIFTS = {
    "a flag dropped": (check_server_flags, lambda d: drop(mlflow_of(d)["command"], "--serve-artifacts")),
    "another value": (check_server_flags, lambda d: set_flag(d, "--workers", "4")),
    "another app": (check_server_flags, lambda d: set_flag(d, "--app-name", "basic-auth-x")),
    "host left local": (check_server_flags, lambda d: set_flag(d, "--host", "127.0.0.1")),
    "another database": (check_server_flags, lambda d: set_flag(
        d, "--backend-store-uri", "postgresql://mlflow@postgres:5432/other")),
    "a port not published": (check_server_flags, lambda d: set_flag(d, "--port", "5001")),
    "an env var missing": (check_server_env, lambda d: mlflow_of(d)["environment"].pop(
        "MLFLOW_FLASK_SERVER_SECRET_KEY")),
    "another constant": (check_server_env, lambda d: mlflow_of(d)["environment"].update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="true")),
    "a literal env secret": (check_server_env, lambda d: mlflow_of(d)["environment"].update(
        AWS_SECRET_ACCESS_KEY="minio123")),
    "another S3 host": (check_server_env, lambda d: mlflow_of(d)["environment"].update(
        MLFLOW_S3_ENDPOINT_URL="http://s3:9000")),
    "ini elsewhere": (check_server_env, lambda d: mlflow_of(d)["environment"].update(
        MLFLOW_AUTH_CONFIG_PATH="/etc/basic_auth.ini")),
    "an ini key missing": (check_auth_ini, lambda d: edit_config(
        d, "basic_auth", "default_permission = READ\n", "")),
    "another default permission": (check_auth_ini, lambda d: edit_config(
        d, "basic_auth", "default_permission = READ", "default_permission = EDIT")),
    "users in the runs' database": (check_auth_ini, lambda d: edit_config(
        d, "basic_auth", "5432/mlflow_auth", "5432/mlflow")),
    "a literal admin password": (check_auth_ini, lambda d: edit_config(
        d, "basic_auth", "${MLFLOW_ADMIN_PASSWORD:?set it in deploy/.env}", "hunter2")),
    "a database not made": (check_databases, lambda d: edit_config(
        d, "initdb", "CREATE DATABASE mlflow_auth OWNER mlflow;", "")),
    "a bucket not made": (check_buckets, lambda d: edit_script(
        d["services"]["buckets"]["command"], " team/dvc-remote", "")),
    "a default secret": (check_no_literal_secret, lambda d: d["services"]["postgres"][
        "environment"].update(POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-postgres}")),
    "a literal key in a script": (check_no_literal_secret, lambda d: edit_script(
        d["services"]["buckets"]["command"], "$$AWS_SECRET_ACCESS_KEY@", "minio123@")),
    "a password in the URI": (check_no_literal_secret, lambda d: set_flag(
        d, "--backend-store-uri", "postgresql://mlflow:pw@postgres:5432/mlflow")),
    "a literal role password": (check_no_literal_secret, lambda d: edit_config(
        d, "initdb", "'${MLFLOW_DB_PASSWORD:?set it in deploy/.env}'", "'postgres'")),
    "the database published": (check_private, lambda d: d["services"]["postgres"].update(
        ports=["5432:5432"])),
    "one password for two roles": (check_private, lambda d: edit_config(
        d, "initdb", "${MLFLOW_DB_PASSWORD:?set it in deploy/.env}", "${POSTGRES_PASSWORD:?set it in deploy/.env}")),
    "mlflow with the root key": (check_private, lambda d: mlflow_of(d)["environment"].update(
        AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:?set it in deploy/.env}")),
    "a database left open": (check_databases, lambda d: edit_config(
        d, "initdb", "REVOKE ALL ON DATABASE mlflow FROM PUBLIC;", "")),
    "another pin": (check_pins, lambda d: edit_script(
        mlflow_of(d)["entrypoint"], "mlflow[auth]==3.17.2", "mlflow[auth]==3.17.1")),
    "another image": (check_pins, lambda d: mlflow_of(d).update(image="ghcr.io/mlflow/mlflow:latest")),
    "data not in a volume": (check_volumes, lambda d: d["services"]["minio"].pop("volumes")),
}


@pytest.mark.parametrize("drift", DRIFTS)
def test_a_drift_fails_its_check(drift):
    check, put_in = DRIFTS[drift]
    doc = copy.deepcopy(load())
    put_in(doc)
    with pytest.raises(AssertionError):
        check(doc)
