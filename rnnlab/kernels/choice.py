"""Which code runs on this CPU, chosen by measuring it, once per machine and shape.

The speed order of the codes flips with the CPU (oneDNN's float32 product beats MKL's on one
CPU and loses on another), so nothing is decided by vendor or ISA flags. Three kinds of decision:
    layer      reference (nn.* or the book's loop), fused (rnnlab/kernels/fused.py) or native
    product    mkl (torch's matmul) or onednn, for one float32 product of the fused path
    precision  float32 or bfloat16, under train.bf16: auto (rnnlab/training/precision.py)
`choose` times every candidate on the real shapes the first time a shape is met and keeps the
fastest: the reference (the first) unless another beats it by MARGIN. Decisions are cached in
`cache_file()` under all that the measurement holds for (`here()`), so that later runs reuse
them and a run never changes its mind half-way (the codes differ in the last float digits).
RNNLAB_KERNEL, RNNLAB_PRODUCT and RNNLAB_PRECISION force a choice (`forced`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from filelock import FileLock

from rnnlab import phases
from rnnlab.errors import UserError
from rnnlab.fileio import cache_dir, write_json
from rnnlab.kernels import cpu, native

FORCE_ENV = {"layer": "RNNLAB_KERNEL", "product": "RNNLAB_PRODUCT",
             "precision": "RNNLAB_PRECISION"}
KNOWN = {"layer": ("reference", "fused", "native"), "product": ("mkl", "onednn"),  # may be forced
         "precision": ("float32", "bfloat16")}
MARGIN = 0.03  # another candidate must be this much faster than the reference to be chosen
ROUNDS = 5  # timed rounds per candidate, alternated between them
MIN_SECONDS = 0.004  # a round repeats a candidate until it takes at least this long
CACHE_VERSION = 2  # 2: keyed by CPU identity, kernel code and library (1: by CPU model name)
STALE_HOURS = 24  # this CPU's entries of other code are dropped when measured longer ago
KERNEL_CODE = Path(__file__).resolve().parent  # rnnlab/kernels: what measures and what runs

_decided: dict[str, dict] = {}  # this process's decisions, full key -> cache entry
_forced: dict[str, str] = {}  # this process's forced choices, "<kind> <key>" -> candidate
_cache_on = [True]  # off inside `afresh`
_said: set[tuple[str, str, str]] = set()  # forced values this process found no candidate for
_quiet = [0]  # > 0 inside `quiet`: decisions are made and kept, not printed
_unmeasured = [0]  # > 0 inside `unmeasured`: an undecided shape takes the reference, untimed


def cpu_model() -> str:
    """The CPU's model name as the OS gives it, e.g. 'AMD EPYC' or 'Apple M2' (bench/'s reports)."""
    return cpu.model_name()


def machine() -> str:
    """The machine a measurement holds for, in words: the CPU (cpu.identity()), torch, its ISA
    level and the threads. The MLflow tag rnnlab.cpu; the start of the cache key (`here`)."""
    return (f"{cpu.identity()} | torch {torch.__version__} | "
            f"{torch.backends.cpu.get_cpu_capability()} | {torch.get_num_threads()} threads")


@cache
def code_digest() -> str:
    """12 hex digits over the kernel code (every .py and .cpp under rnnlab/kernels, by path):
    a decision that other code measured says nothing about this code."""
    files = sorted(p for pattern in ("*.py", "*.cpp") for p in KERNEL_CODE.rglob(pattern))
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(KERNEL_CODE).as_posix()}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:12]


def library_digest() -> str:
    """The compiled library that a `native` candidate runs: its build key, or "none" when
    RNNLAB_NATIVE=0 turns it off."""
    return "none" if native.disabled() else native.build_key()


def here() -> str:
    """What a decision made now holds for, the cache key's first part: `machine()` and the code
    that measures, `<machine()> | code <code_digest()> | native <library_digest()>`. A full key
    adds `| <kind> <key> | <candidates>`. machine() names the CPU by cpu.identity(), since one
    model name covers CPUs whose winners differ."""
    return f"{machine()} | code {code_digest()} | native {library_digest()}"


def forced(kind: str, key: str, allowed: list[str]) -> str | None:
    """The candidate the environment forces for `kind`, or None (measure): RNNLAB_KERNEL=
    reference|fused|native, RNNLAB_PRODUCT=mkl|onednn, RNNLAB_PRECISION=float32|bfloat16; unset
    or `measure` measures, another value is a UserError. A value that names a candidate `key`
    lacks (fused for an lstm, native where it did not build) gives the reference, said once: the
    setting holds for a whole sweep of variants."""
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
        _forced[f"{kind} {key}"] = force
        return force
    if len(names) == 1:
        return names[0]
    full = f"{here()} | {kind} {key} | {'/'.join(names)}"
    entry = _decided.get(full) or _cached(full)
    if entry is None and _unmeasured[0]:
        return names[0]
    if entry is None:
        seconds = measure(candidates)
        reference = seconds[names[0]]
        best = min(names, key=seconds.__getitem__)
        choice = best if seconds[best] < reference * (1 - MARGIN) else names[0]
        entry = {"kind": kind, "key": key, "choice": choice, "seconds": seconds,
                 "when": datetime.datetime.now().isoformat(timespec="seconds"),
                 "cpu": cpu.identity(), "code": code_digest(), "native": library_digest()}
        entry = _store(full, entry)  # another process may have decided it first: theirs holds
    if full not in _decided:
        _decided[full] = entry
        if not _quiet[0]:
            print(f"kernels: {line(entry)}", file=sys.stderr, flush=True)
    return entry["choice"]


def measure(candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median seconds per call of each candidate: one untimed call each (which may make nested
    decisions), then ROUNDS rounds in alternating order. Torch's random state is left as it was."""
    with phases.phase("measurement"), torch.random.fork_rng(devices=[]):
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


def chosen() -> dict[str, str]:
    """What this process runs for each decision, forced or measured: {"<kind> <key>": choice}.
    A resumable training records it, to tell which code trained its epochs."""
    return {**{f"{e['kind']} {e['key']}": e["choice"] for e in _decided.values()}, **_forced}


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
def unmeasured() -> Iterator[None]:
    """Inside: decisions already made (this process, the cache) hold, and a shape met for the
    first time runs the reference without measuring or storing anything (a served model: a
    request's prefix length must not buy seconds of measurement)."""
    _unmeasured[0] += 1
    try:
        yield
    finally:
        _unmeasured[0] -= 1


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
    _forced.clear()


def cached_here() -> list[dict]:
    """The cache's decisions for this machine now (`here()`: CPU, torch, ISA level, threads,
    kernel code, compiled library)."""
    prefix = here() + " | "
    return [entry for full, entry in _read().items() if full.startswith(prefix)]


def forget_cached() -> int:
    """Remove this machine's decisions from the cache (`rnnlab kernels --forget`); how many."""
    prefix = here() + " | "
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
    holds. This CPU's stale entries (`_stale`) go on the way. A cache that cannot be written
    costs a warning, not the run."""
    if not _cache_on[0]:
        return entry
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=60):
            entries = _read()
            if full in entries:
                return entries[full]
            entries = {k: v for k, v in entries.items() if not _stale(v)}
            entries[full] = entry
            write_json(path, {"version": CACHE_VERSION, "entries": entries})
    except (OSError, UserError, TimeoutError) as err:
        print(f"rnnlab: kernel choices not cached ({err}); this process keeps its own",
              file=sys.stderr)
    return entry


def _stale(entry: dict) -> bool:
    """Whether `entry` was measured on this CPU, over STALE_HOURS ago, by other kernel code or
    another compiled library than this process runs: no key made here can reach it again (a
    younger one may be another checkout's on this machine). Other CPUs' entries are theirs."""
    try:
        age = datetime.datetime.now() - datetime.datetime.fromisoformat(entry.get("when", ""))
    except ValueError:
        age = datetime.timedelta.max
    return (entry.get("cpu") == cpu.identity() and age > datetime.timedelta(hours=STALE_HOURS)
            and (entry.get("code"), entry.get("native")) != (code_digest(), library_digest()))
