"""The process guard of a sweep's worker: runs a command that dies, whole, with the process that
started it.

    python rnnlab/cluster/guard.py FOLDER PARENT_PID -- CMD ...   (by path: standard library only)

Why: a Dask worker killed with SIGKILL runs no code of its own, and the `dvc exp run` it started
would train on as an orphan. The worker starts the guard in a session of its own; the guard asks
for PR_SET_PDEATHSIG (Linux: SIGTERM when the parent dies; nothing runs between fork and exec in
the multi-threaded worker). On SIGTERM, or if the parent is gone already, it sends SIGTERM to its
process group (the training ends its MLflow run as KILLED), then SIGKILL to what is left after
GRACE seconds. Exit status: the command's.
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
    """Ask the kernel for `sig` when this process's parent dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass


def command(folder: str, *cmd: str) -> list[str]:
    """The guard's command line around `cmd`, for a child of this process."""
    return [sys.executable, __file__, folder, str(os.getpid()), "--", *cmd]


def main(argv: list[str]) -> int:
    folder, parent, sep, *cmd = argv if len(argv) >= 3 else ["", "", ""]
    if sep != "--" or not cmd or not parent.isdigit():
        print("usage: python guard.py FOLDER PARENT_PID -- CMD ...", file=sys.stderr)
        return 2
    die_with_parent()

    def stop(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM reaches us too
        os.killpg(0, signal.SIGTERM)
        deadline = time.monotonic() + GRACE
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.1)
        os.killpg(0, signal.SIGKILL)

    child = subprocess.Popen(cmd, cwd=folder)
    signal.signal(signal.SIGTERM, stop)
    if os.getppid() != int(parent):  # the parent died before PR_SET_PDEATHSIG took hold
        stop(signal.SIGTERM, None)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
