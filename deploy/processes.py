"""The stack's servers as local processes: free ports, start in the background with a pid file and
a log, wait until a service answers, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from deploy.settings import START_SECONDS, Paths, port_answers, team_dir
from rnnlab.errors import UserError


def alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, IndexError):
        return None
    except PermissionError:  # alive, but another user's (PostgreSQL run as `postgres`)
        return pid



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
