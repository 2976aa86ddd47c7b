"""Run a command so that it dies with the process that started it, whole.

    python rnnlab/cluster/guard.py FOLDER -- CMD ...   (by path: it imports the standard library only)

A Dask worker killed with SIGKILL runs no code of its own: the `dvc exp run` it started, and the
training under it, would train on as orphans and finish an MLflow run that the rerun of the same
experiment on another worker finishes too. So the worker starts this guard with
PR_SET_PDEATHSIG (Linux: the kernel sends SIGTERM when the parent dies) in a session of its own;
on SIGTERM the guard sends SIGTERM to its whole process group (the training ends its MLflow run
as KILLED), then SIGKILL to what is left after GRACE seconds. Exit status: the command's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE = 10.0  # seconds between SIGTERM and SIGKILL of the group
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """preexec_fn: a session of its own, and `sig` when the parent dies (Linux; elsewhere only
    the session)."""
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    folder, sep, *cmd = argv
    if sep != "--" or not cmd:
        print("usage: python guard.py FOLDER -- CMD ...", file=sys.stderr)
        return 2

    def stop(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM reaches us too
        os.killpg(0, signal.SIGTERM)
        deadline = time.monotonic() + GRACE
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.1)
        os.killpg(0, signal.SIGKILL)

    child = subprocess.Popen(cmd, cwd=folder)
    signal.signal(signal.SIGTERM, stop)
    if os.getppid() == 1:  # the parent died before PR_SET_PDEATHSIG took hold
        stop(signal.SIGTERM, None)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
