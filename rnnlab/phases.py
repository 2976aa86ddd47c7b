"""The stage profiler: the time a stage process spends in each phase, written under RNNLAB_PROFILE
(for bench/run_profile.py, which adds DVC's share). Each second is charged to exactly one phase,
the innermost open one:

    startup      from the process's start to its `main` (the interpreter, torch, every import)
    measurement  rnnlab/kernels/choice.py timing candidates (a cache hit costs nothing)
    training     the epochs (their validation scores included)
    evaluation   the evaluate stage's scores and samples
    tracking     MLflow: importing it, opening and ending the run, every write
    other        the rest: reading data, checkpoints, plots, JSON

With RNNLAB_PROFILE=<file> each stage appends one JSON line to the file when its main ends
(`record`); without it the phases cost two clock reads each and nothing is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PROFILE_ENV = "RNNLAB_PROFILE"
PHASES = ("startup", "measurement", "training", "evaluation", "tracking", "other")

_spent: dict[str, float] = defaultdict(float)
_open = ["other"]  # the phases entered and not left, innermost last
_since = [time.perf_counter()]  # when the innermost phase last started being charged


def _charge() -> None:
    now = time.perf_counter()
    _spent[_open[-1]] += now - _since[0]
    _since[0] = now


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the block's time to `name`, less what phases nested in it take."""
    _charge()
    _open.append(name)
    try:
        yield
    finally:
        _charge()
        _open.pop()


def process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0, startup unknown)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def begin() -> None:
    """A stage's main starts: what came before it was start-up."""
    _spent.clear()
    _spent["startup"] = process_age()
    _open[:] = ["other"]
    _since[0] = time.perf_counter()


def record(stage: str) -> None:
    """A stage's main ends: append its phases to $RNNLAB_PROFILE, if set."""
    target = os.environ.get(PROFILE_ENV)
    if not target:
        return
    _charge()
    end = time.time()
    spent = {name: round(_spent.get(name, 0.0), 3) for name in PHASES}
    line = {"stage": stage, "started": round(end - sum(spent.values()), 3), "ended": round(end, 3),
            "seconds": spent}
    try:
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as err:
        print(f"rnnlab: profile not written to {target} ({err})", file=sys.stderr)
