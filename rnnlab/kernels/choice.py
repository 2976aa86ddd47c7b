"""Which code runs on this CPU, chosen by measuring it, once per machine and shape.

The same function can run through several codes whose speed order flips with the CPU: on one
AMD EPYC oneDNN's float32 product runs at twice MKL's rate, on an Intel Xeon at half of it, and
nn.GRU beats the fused path on a third CPU. So nothing here is decided by vendor or by ISA flags:

    layer     how a recurrent stack trains (forward and backward):
                reference  nn.RNN / nn.GRU (torch impl), the book's loop over steps (scratch impl)
                fused      rnnlab/kernels/fused.py: one autograd op per layer, backward by hand
                native     the same in compiled code (rnnlab/kernels/native.py), where it builds
    product   which library makes one float32 product of the fused path:
                mkl        torch's matmul (MKL, or whatever BLAS the build has)
                onednn     oneDNN's linear, the weight laid out once where it serves many products

`choose` times every candidate on the real shapes (a few rounds, alternated, medians) the first
time a shape is met and keeps the fastest; the reference (the first candidate) unless another
beats it by MARGIN. The decision is cached in `cache_dir() / kernels.json` under the CPU model,
torch version, ISA level and thread count, so later runs on this machine take it without measuring
and a run never changes its mind half-way (the codes differ in the last float digits). `report()`
lists the decisions this process made or read, for the log and the MLflow run's tags.

Forcing (tests, and anyone who wants a fixed path): RNNLAB_KERNEL=reference|fused|native and
RNNLAB_PRODUCT=mkl|onednn; unset or `measure` measures. RNNLAB_CACHE_DIR moves the cache.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from filelock import FileLock

from rnnlab.errors import UserError
from rnnlab.fileio import cache_dir, write_json

FORCE_ENV = {"layer": "RNNLAB_KERNEL", "product": "RNNLAB_PRODUCT"}
KNOWN = {"layer": ("reference", "fused", "native"), "product": ("mkl", "onednn")}  # what forcing may name
MARGIN = 0.03  # another candidate must be this much faster than the reference to be chosen
ROUNDS = 5  # timed rounds per candidate, alternated between them
MIN_SECONDS = 0.004  # a round repeats a candidate until it takes at least this long
CACHE_VERSION = 1

_decided: dict[str, dict] = {}  # this process's decisions, full key -> cache entry
_cache_on = [True]  # off inside `afresh`
_said: set[tuple[str, str, str]] = set()  # forced values this process found no candidate for
_quiet = [0]  # > 0 inside `quiet`: decisions are made and kept, not printed


@cache
def cpu_model() -> str:
    """The CPU's model name as the OS gives it (lscpu's), e.g. 'AMD EPYC' or 'Apple M2'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    """What a measurement holds for: the CPU model, torch, its ISA level and the threads."""
    return (f"{cpu_model()} | torch {torch.__version__} | "
            f"{torch.backends.cpu.get_cpu_capability()} | {torch.get_num_threads()} threads")


def forced(kind: str, key: str, allowed: list[str]) -> str | None:
    """The candidate the environment forces for `kind`, or None (measure). A value that names a
    candidate `key` lacks (fused for an lstm, native where it did not build) gives the reference,
    said once: the setting holds for a whole sweep of variants."""
    name = FORCE_ENV[kind]
    value = os.environ.get(name, "measure").strip() or "measure"
    if value == "measure":
        return None
    if value not in KNOWN[kind]:
        raise UserError(f"{name} = {value!r}: allowed: measure, {', '.join(KNOWN[kind])}")
    if value not in allowed:
        if (kind, key, value) not in _said and not _quiet[0]:
            _said.add((kind, key, value))
            print(f"kernels: {kind} {key}: no {value} here ({name}); {allowed[0]} runs",
                  file=sys.stderr, flush=True)
        return allowed[0]
    return value


def choose(kind: str, key: str, candidates: dict[str, Callable[[], object]]) -> str:
    """The candidate to run for `key`: forced, decided before (this process, then the cache), or
    measured now. The first candidate is the reference."""
    names = list(candidates)
    force = forced(kind, key, names)
    if force:
        return force
    if len(names) == 1:
        return names[0]
    full = f"{machine()} | {kind} {key} | {'/'.join(names)}"
    entry = _decided.get(full) or _cached(full)
    if entry is None:
        seconds = measure(candidates)
        reference = seconds[names[0]]
        best = min(names, key=seconds.__getitem__)
        choice = best if seconds[best] < reference * (1 - MARGIN) else names[0]
        entry = {"kind": kind, "key": key, "choice": choice, "seconds": seconds,
                 "when": datetime.datetime.now().isoformat(timespec="seconds")}
        entry = _store(full, entry)  # another process may have decided it first: theirs holds
    if full not in _decided:
        _decided[full] = entry
        if not _quiet[0]:
            print(f"kernels: {line(entry)}", file=sys.stderr, flush=True)
    return entry["choice"]


def measure(candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median seconds per call of each candidate: one untimed call each (which may make nested
    decisions), then ROUNDS rounds in alternating order. Torch's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        first = {}
        for name, fn in candidates.items():
            fn()
            start = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - start
        repeat = {name: max(1, round(MIN_SECONDS / max(t, 1e-7))) for name, t in first.items()}
        times: dict[str, list[float]] = {name: [] for name in candidates}
        order = list(candidates)
        for r in range(ROUNDS):
            for name in order if r % 2 == 0 else reversed(order):
                fn, n = candidates[name], repeat[name]
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                times[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report() -> list[str]:
    """One line per decision this process made or read: what runs, and how it measured."""
    return [line(entry) for entry in _decided.values()]


def line(entry: dict) -> str:
    """A decision in words: `layer gru torch: ...: fused (against reference: fused 1.18x)`."""
    seconds = entry["seconds"]
    reference = next(iter(seconds))
    speed = ", ".join(f"{name} {reference_over(seconds, name):.2f}x" for name in seconds
                      if name != reference)
    return f"{entry['kind']} {entry['key']}: {entry['choice']} (against {reference}: {speed})"


def summary() -> str:
    """The decisions in one short string for an MLflow tag: `layer=fused product=onednn,mkl`."""
    chosen: dict[str, list[str]] = {}
    for entry in _decided.values():
        names = chosen.setdefault(entry["kind"], [])
        if entry["choice"] not in names:
            names.append(entry["choice"])
    return " ".join(f"{kind}={','.join(names)}" for kind, names in chosen.items()) or "none"


def reference_over(seconds: dict[str, float], name: str) -> float:
    """How many times faster `name` ran than the reference (the first)."""
    return next(iter(seconds.values())) / seconds[name]


@contextmanager
def quiet() -> Iterator[None]:
    """Inside: decisions made and kept as ever, but not printed (text generation: whoever asked
    for text did not ask how the products were measured)."""
    _quiet[0] += 1
    try:
        yield
    finally:
        _quiet[0] -= 1


@contextmanager
def afresh() -> Iterator[None]:
    """Inside: every decision measured anew, the cache neither read nor written (the benchmark's
    own measurements); this process's earlier decisions forgotten on the way in and out."""
    forget()
    _cache_on[0] = False
    try:
        yield
    finally:
        _cache_on[0] = True
        forget()


def forget() -> None:
    """Drop this process's decisions (tests): the next `choose` reads the cache or measures."""
    _decided.clear()


def cached_here() -> list[dict]:
    """The cache's decisions for this machine (CPU, torch, ISA level, threads now)."""
    prefix = machine() + " | "
    return [entry for full, entry in _read().items() if full.startswith(prefix)]


def forget_cached() -> int:
    """Remove this machine's decisions from the cache (`rnnlab kernels --forget`); how many."""
    prefix = machine() + " | "
    with FileLock(str(cache_file()) + ".lock", timeout=60):
        entries = _read()
        kept = {k: v for k, v in entries.items() if not k.startswith(prefix)}
        write_json(cache_file(), {"version": CACHE_VERSION, "entries": kept})
    return len(entries) - len(kept)


def cache_file() -> Path:
    """The cache of decisions: kernels.json in `cache_dir()`."""
    return cache_dir() / "kernels.json"


def _read() -> dict:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if data.get("version") == CACHE_VERSION else {}


def _cached(full: str) -> dict | None:
    return _read().get(full) if _cache_on[0] else None


def _store(full: str, entry: dict) -> dict:
    """Add the decision to the cache unless another process stored one first; -> the one that
    holds. A cache that cannot be written costs a warning, not the run."""
    if not _cache_on[0]:
        return entry
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=60):
            entries = _read()
            if full in entries:
                return entries[full]
            entries[full] = entry
            write_json(path, {"version": CACHE_VERSION, "entries": entries})
    except (OSError, UserError, TimeoutError) as err:
        print(f"rnnlab: kernel choices not cached ({err}); this process keeps its own",
              file=sys.stderr)
    return entry
