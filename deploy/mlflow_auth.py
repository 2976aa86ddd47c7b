"""The MLflow tracking server with basic-auth: its command line and auth config, its start, and the
admin API calls that add users and grant permissions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import requests

from deploy.processes import alive, claim_port, spawn, wait_for
from deploy.settings import ADMIN, ARTIFACT_BUCKET, QUIET, Paths, Stack, write_private
from rnnlab.errors import UserError


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
        # A password check is a slow hash, on purpose: a checked login is trusted for 60 s rather
        # than hashed on every request (a change through the API applies at once).
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
