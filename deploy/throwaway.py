"""A throwaway team stack on free ports, for tests and benchmarks: `python -m deploy.stack up` in
a temporary TEAM_DIR, and `down` at the end whatever happens.

    with team_stack(tmp_path / "team") as team:
        team.env        # the `export` lines `up` printed, as a dict (the member user's login)
        team.stack      # deploy.settings.Stack: ports, admin password, ...
        team.cli("user", "bob")   # any deploy.stack command, output parsed when it exports

PostgreSQL, moto's S3 server and `mlflow server --app-name basic-auth` run as the real programs.
Every secret is planted: `planted-<what>-<tag>` (`PLANTED`), so that a leak test finds it by name.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from deploy.settings import Paths, Stack, free_port, load_stack, write_private

PROJECT = Path(__file__).resolve().parents[1]
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1"}
PLANTED = "planted-"  # every planted secret starts so


def planted_stack() -> Stack:
    """The stack's settings with each secret an unmistakable value of its own, on free ports."""
    tag = secrets.token_hex(4)
    return Stack(postgres_port=free_port(), s3_port=free_port(), mlflow_port=free_port(),
                 user="researcher", user_password=f"{PLANTED}member-password-{tag}",
                 admin_password=f"{PLANTED}admin-password-{tag}",
                 db_password=f"{PLANTED}database-password-{tag}",
                 s3_key=f"team{tag}", s3_secret=f"{PLANTED}s3-secret-{tag}",
                 flask_secret=f"{PLANTED}flask-secret-{tag}",
                 user_pg_password=f"{PLANTED}member-pg-password-{tag}",
                 user_s3_key=f"AKIAMEMBER{tag.upper()}",
                 user_s3_secret=f"{PLANTED}member-s3-secret-{tag}")


def stack_secrets(stack: Stack) -> dict[str, str]:
    """The stack's secrets by name (the S3 key id is no secret: it names the key)."""
    return {"the member's MLflow password": stack.user_password,
            "the MLflow admin's password": stack.admin_password,
            "the database password": stack.db_password, "the S3 secret": stack.s3_secret,
            "the Flask secret": stack.flask_secret,
            "the member's database password": stack.user_pg_password,
            "the member's S3 secret": stack.user_s3_secret}


def parse_exports(text: str) -> dict[str, str]:
    """`export NAME=value` lines (shell-quoted) as a dict; comments and other lines ignored."""
    env = {}
    for line in text.splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = shlex.split(value)[0] if value else ""
    return env


@dataclass
class TeamStack:
    """A running stack: its folder, the environment `up` ran in, and what `up` printed."""

    root: Path
    base_env: dict[str, str]  # this process's, with TEAM_DIR, the ports and PYTHONPATH set
    env: dict[str, str]  # the member user's login, as `up` exported it
    up_output: subprocess.CompletedProcess

    @property
    def paths(self) -> Paths:
        return Paths(self.root)

    @property
    def stack(self) -> Stack:
        return load_stack(self.paths)

    def cli(self, *args: str, cwd: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run `python -m deploy.stack ARGS` against this stack (from its own folder, which is no
        DVC repository, so `up` adds no remote anywhere)."""
        result = subprocess.run([sys.executable, "-m", "deploy.stack", *args], cwd=cwd or self.root,
                                env=self.base_env, capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"deploy.stack {' '.join(args)} failed:\n{result.stderr}")
        return result

    def user_env(self, name: str, service: bool = False) -> dict[str, str]:
        """A new user's environment (what `deploy.stack user [--service] NAME` prints)."""
        return parse_exports(self.cli("user", *(["--service"] if service else []), name).stdout)


def shell_env(login: dict[str, str], **extra: str) -> dict[str, str]:
    """A user's shell: this process's environment without its MLflow, DVC or AWS settings, then
    `login` (a stack's exports) and `extra` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "AWS_"))}
    return {**env, **QUIET, **login, **extra}


def stack_env(root: Path) -> dict[str, str]:
    """The environment of `deploy.stack` commands for a stack under `root`, on free ports."""
    env = {**os.environ, **QUIET, "TEAM_DIR": str(root)}
    for name in ("POSTGRES", "S3", "MLFLOW"):
        env[f"TEAM_{name}_PORT"] = str(free_port())
    # PYTHONPATH: `python -m deploy.stack` from any working directory
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
    return env


@contextmanager
def team_stack(root: Path, cwd: Path | None = None) -> Iterator[TeamStack]:
    """Start the stack under `root` (made readable for PostgreSQL's user), its secrets planted
    (`planted_stack`), and stop it after."""
    root.mkdir(parents=True, exist_ok=True)
    for parent in [root.parent, *root.parent.parents]:  # let `postgres` reach its data folder
        if parent.stat().st_uid == os.geteuid() and str(parent).startswith(("/tmp", "/var/tmp")):
            parent.chmod(parent.stat().st_mode | 0o011)
    if not Paths(root).config.exists():
        write_private(Paths(root).config, json.dumps(asdict(planted_stack()), indent=2) + "\n")
    env = stack_env(root)
    up = subprocess.run([sys.executable, "-m", "deploy.stack", "up"], cwd=cwd or root.parent,
                        env=env, capture_output=True, text=True, timeout=300)
    try:
        if up.returncode != 0:
            raise AssertionError(f"deploy.stack up failed:\n{up.stderr}")
        yield TeamStack(root, env, parse_exports(up.stdout), up)
    finally:
        subprocess.run([sys.executable, "-m", "deploy.stack", "down"], env=env,
                       capture_output=True, timeout=120)
