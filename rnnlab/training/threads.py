"""CPU threads for a stage's PyTorch: `train.threads: auto` shares the cores among parallel work.

Trainings that share cores preempt each other inside every matmul, so `auto` gives each of the P
that run at once cpus // P threads (at least 1). P is the larger of this repository's DVC queue
workers (all started before any stage runs) and the stage processes running on this machine now
(`python -m <module>` for the modules the stage hands down: stages/__init__.py), this one too.

The number is chosen once, when the stage starts, and kept for the whole run: the thread count
changes the order of float additions, so the last digits. Set `train.threads` to a number to
make a run bit-identical to another.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def queue_workers(root: Path, processes: list[dict]) -> int:
    """`dvc exp queue-worker` processes of the repository at `root` (their working directory is
    <root>/.dvc/tmp/exps/celery)."""
    wdir = root.resolve() / ".dvc"
    return sum(1 for p in processes if "queue-worker" in p["cmdline"] and _is_relative_to(p["cwd"], wdir))


def running_stages(processes: list[dict], modules: tuple[str, ...]) -> int:
    """Python processes running one of `modules` (`python -m <module>`), this one included."""
    return sum(1 for p in processes
               if any(p["cmdline"][i:i + 2] == ["-m", m]
                      for m in modules for i in range(len(p["cmdline"]) - 1)))


def auto_threads(root: Path, stage_modules: tuple[str, ...]) -> tuple[int, str]:
    """Threads for one of the trainings that run at once, and why (for the log); `stage_modules`:
    the modules whose processes share the CPUs (`running_stages`)."""
    processes = _processes()  # one look at the process table serves both counts
    cpus, workers = usable_cpus(), queue_workers(root, processes)
    stages = running_stages(processes, stage_modules)
    parallel = max(1, workers, stages)
    threads = max(1, cpus // parallel)
    why = (f"auto: {cpus} CPUs shared by {parallel} parallel "
           f"{'DVC queue workers' if workers >= stages else 'stages'}" if parallel > 1
           else f"auto: all {cpus} CPUs, nothing else running")
    return threads, why


def _processes() -> list[dict]:
    """Command line and working directory of each process we may look at (others are skipped)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        info = proc.info
        if info.get("cmdline"):
            found.append({"cmdline": info["cmdline"], "cwd": info.get("cwd") or ""})
    return found


def _is_relative_to(path: str, folder: Path) -> bool:
    return bool(path) and Path(path).is_relative_to(folder)
