"""How much CPU the `dvc repro` parent process spends while a stage's command runs.

    python -m bench.dvc_overhead                     # epochs 2, hidden 640, 1 thread
    python -m bench.dvc_overhead --epochs 1 --hidden-size 512

In a clone of HEAD with params that make `train@rnn` run for some tens of seconds: `dvc repro
tokenize` (not measured), then `dvc repro train@rnn` (or `dvc exp run`), sampling with psutil the
cumulative CPU of the dvc process, of each of its threads, of the stage and of any other
descendant. Over the window the stage was seen running, a share of a core is CPU seconds / wall
seconds. `shares` takes plain `Sample`s, so it is tested without DVC. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.lib.clone import tiny_clone

STAGE_MARK = "stages.train"  # in the stage process's command line


@dataclass
class Sample:
    """One reading: cumulative CPU seconds (user + system) at monotonic time `t`."""

    t: float
    parent: float  # the dvc process
    stage: float | None  # the stage's process and its descendants; None: not running
    helpers: dict[int, float] = field(default_factory=dict)  # pid -> CPU: other descendants of dvc
    threads: dict[int, float] = field(default_factory=dict)  # thread id -> CPU: the dvc process's


def _cpu(proc) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def sample(parent, is_stage=lambda cmdline: STAGE_MARK in " ".join(cmdline)) -> Sample | None:
    """Read `parent` (a psutil.Process, or anything with cpu_times(), threads(), children() and
    cmdline() as psutil's) and its descendants now. None when `parent` is gone."""
    t = time.monotonic()
    try:
        parent_cpu = _cpu(parent)
        threads = {th.id: th.user_time + th.system_time for th in parent.threads()}
        children = parent.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    ppid, cpu, roots = {}, {}, set()
    for child in children:
        try:
            ppid[child.pid] = child.ppid()
            cpu[child.pid] = _cpu(child)
            if is_stage(child.cmdline()):
                roots.add(child.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue  # exited between the listing and the reading

    def in_stage(pid: int) -> bool:
        while pid in ppid:
            if pid in roots:
                return True
            pid = ppid[pid]
        return False

    stage = [c for pid, c in cpu.items() if in_stage(pid)]
    helpers = {pid: c for pid, c in cpu.items() if not in_stage(pid)}
    return Sample(t, parent_cpu, sum(stage) if stage else None, helpers, threads)


def shares(samples: list[Sample], cores: int | None = None) -> dict:
    """CPU seconds and shares over the window in which the stage was seen running: from the first
    sample that saw it to the last. A helper's CPU counts from the window's start (all of it if it
    started later); the dvc process's threads are listed by CPU spent in the window, most first."""
    running = [s for s in samples if s.stage is not None]
    if len(running) < 2:
        raise ValueError(f"the stage was seen in {len(running)} sample(s): too short to measure")
    first, last = running[0], running[-1]
    wall = last.t - first.t
    if wall <= 0:
        raise ValueError("the samples' times do not increase")
    parent = last.parent - first.parent
    stage = last.stage - first.stage
    seen: dict[int, float] = {}  # each helper's largest reading within the window
    for s in running:
        for pid, c in s.helpers.items():
            seen[pid] = max(seen.get(pid, 0.0), c)
    helpers = sum(c - first.helpers.get(pid, 0.0) for pid, c in seen.items())
    threads = sorted(({"thread": tid, "cpu_seconds": c - first.threads.get(tid, 0.0)}
                      for tid, c in last.threads.items()), key=lambda d: -d["cpu_seconds"])
    cores = cores or os.cpu_count() or 1
    return {
        "wall_seconds": wall,
        "dvc_seconds_before_stage": first.t - samples[0].t,  # start-up, status, locks
        "dvc_seconds_after_stage": samples[-1].t - last.t,  # saving outputs, dvc.lock
        # CPU since dvc started (samples[0] is taken right after): before, after the stage
        "dvc_parent_cpu_seconds_before_stage": first.parent,
        "dvc_parent_cpu_seconds_after_stage": samples[-1].parent - last.parent,
        "samples": len(running),
        "dvc_parent_cpu_seconds": parent,
        "helpers_cpu_seconds": helpers,
        "helper_processes": len(seen),
        "stage_cpu_seconds": stage,
        "dvc_parent_share_of_a_core": parent / wall,
        "dvc_parent_and_helpers_share_of_a_core": (parent + helpers) / wall,
        "stage_share_of_cores": stage / wall,
        "cores": cores,
        "dvc_parent_threads": threads,
    }


def watch(proc, interval: float = 0.2, is_stage=None) -> list[Sample]:
    """Sample `proc` (a psutil.Process) and its descendants every `interval` seconds until it
    exits (the caller reaps it)."""
    samples = []
    kwargs = {} if is_stage is None else {"is_stage": is_stage}
    while True:
        s = sample(proc, **kwargs)
        if s is None:
            break
        samples.append(s)  # a zombie's last reading is its total
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    return samples


def dvc_parent_share(work: Path, epochs: int = 2, hidden_size: int = 640, threads: int = 1,
                     interval: float = 0.2, extra_env: dict[str, str] | None = None,
                     dvc_args: tuple[str, ...] = (), exp: bool = False,
                     dvc_config: dict[str, str] | None = None) -> dict:
    """Run `dvc repro train@rnn` in a clone of HEAD under `work` and measure, while the stage ran,
    the CPU of the dvc process (and any helper it started) against the stage's. `extra_env`: set
    for dvc (and so the stage); `dvc_args`: before `repro` (e.g. ("-q",)); exp: `dvc exp run
    train@rnn` instead of `dvc repro train@rnn`; dvc_config: `dvc config --local` settings of the
    clone, e.g. {"core.autostage": "false"}."""
    repo, env, dvc = tiny_clone(work, max_tokens=None, epochs=epochs, hidden_size=hidden_size,
                                num_steps=64, batch_size=32, threads=threads)
    env.update(extra_env or {})
    for key, value in (dvc_config or {}).items():
        subprocess.run([dvc, "config", "--local", key, value], cwd=repo, env=env, check=True)
    subprocess.run([dvc, "repro", "tokenize"], cwd=repo, env=env, check=True,
                   capture_output=True, text=True)
    log = work / "repro.log"
    me = psutil.Process()
    me_before, t0 = _cpu(me), time.monotonic()
    with open(log, "w") as out:
        command = ["exp", "run"] if exp else ["repro"]
        popen = subprocess.Popen([dvc, *dvc_args, *command, "train@rnn"], cwd=repo, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
        proc = psutil.Process(popen.pid)
        samples = watch(proc, interval)
        whole_cpu = samples[-1].parent if samples else float("nan")
        popen.wait()
    total_wall = time.monotonic() - t0
    if popen.returncode:
        raise RuntimeError(f"dvc {' '.join(command)} train@rnn failed in {repo}:\n"
                           f"{log.read_text()}")
    result = shares(samples)
    result.update(
        dvc_total_wall_seconds=total_wall,
        dvc_parent_cpu_seconds_whole_run=whole_cpu,  # with its start-up and status checks
        sampler_cpu_seconds=_cpu(me) - me_before,  # this process's own, as a yardstick
        settings={"epochs": epochs, "hidden_size": hidden_size, "threads": threads,
                  "interval": interval, "extra_env": extra_env or {},
                  "dvc_args": list(dvc_args), "command": " ".join(command),
                  "dvc_config": dvc_config or {}},
        ran_the_stage="Running stage 'train@rnn'" in log.read_text(),
    )
    return result


def main(argv: list[str] | None = None) -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=640)
    parser.add_argument("--threads", type=int, default=1, help="the stage's train.threads")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--exp", action="store_true", help="`dvc exp run`, not `dvc repro`")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="`dvc config --local` settings of the clone (core.autostage=false)")
    args = parser.parse_args(argv)
    config = dict(item.split("=", 1) for item in args.config)
    with tempfile.TemporaryDirectory(prefix="rnnlab-dvc-overhead-") as tmp:
        result = dvc_parent_share(Path(tmp), args.epochs, args.hidden_size, args.threads,
                                  args.interval, exp=args.exp, dvc_config=config)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
