"""What this CPU is, for the keys of the kernel caches (choice.py's kernels.json, native.py's
builds), which a cluster's nodes may share through one home folder.

A model name is not enough: "AMD EPYC" covers Zen 2 to Zen 5, whose fastest code differs and
whose instruction sets differ (an AVX-512 build dies with an illegal instruction on an AVX2 node).
So a CPU is known by its family, model and stepping and a digest of its ISA flags (/proc/cpuinfo);
where there is no /proc/cpuinfo (macOS, some sandboxes), by the compiler's `-march=native` macro
set, which names exactly the ISA a native build targets and the compiler's version.

Callers call through the module (`cpu.identity()`), never a name bound at import: a test fakes
another CPU by monkeypatching one function here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import subprocess
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
MACRO_TIMEOUT = 60  # seconds: a compiler that hangs on an empty file gives no macro set
# The fields of a /proc/cpuinfo block that tell apart CPUs of one model name: x86's, then ARM's.
IDENTIFYING = (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"),
               ("CPU implementer", "implementer"), ("CPU part", "part"),
               ("CPU variant", "variant"), ("CPU revision", "revision"))


def digest(text: str, length: int = 8) -> str:
    """A short hex digest of `text`, for a key that must fit in a file name or a log line."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as {field: value} (vendor_id, model name,
    cpu family, model, stepping, flags or ARM's Features, ...); {} where there is none."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.strip().split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def compiler() -> tuple[str, ...]:
    """The C++ compiler's command: $CXX (may hold arguments), else `c++`."""
    return _split(os.environ.get("CXX") or "c++")


@functools.cache
def _split(command: str) -> tuple[str, ...]:
    """shlex.split, once per command: kernel choices ask for the compiler on every decision."""
    return tuple(shlex.split(command))


def native_macros() -> str | None:
    """The macros the compiler predefines under -march=native, sorted, one a line: exactly the ISA
    a native build targets (__AVX512F__, __znver3__, ...) and the compiler's version (__VERSION__,
    __clang_version__). None where the compiler does not run."""
    return _macros(compiler())


@functools.cache
def _macros(command: tuple[str, ...]) -> str | None:
    """native_macros() for one compiler command: run once per process and command."""
    try:
        done = subprocess.run([*command, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                              check=False, capture_output=True, text=True, timeout=MACRO_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return "\n".join(sorted(done.stdout.splitlines()))


@functools.cache
def isa_digest() -> str:
    """8 hex digits for the instruction set: of /proc/cpuinfo's flags (sorted), else of the
    -march=native macro set, else of the architecture and torch's ISA level (the least that
    tells an AVX2 machine from an AVX-512 one)."""
    flags = cpuinfo().get("flags") or cpuinfo().get("Features")
    if flags:
        return digest("flags " + " ".join(sorted(flags.split())))
    macros = native_macros()
    if macros:
        return digest("macros " + macros)
    import torch

    return digest(f"arch {platform.machine()} {torch.backends.cpu.get_cpu_capability()}")


def model_name() -> str:
    """The CPU's model name as the OS gives it, e.g. 'AMD EPYC' or 'Apple M2'."""
    return (cpuinfo().get("model name") or platform.processor() or platform.machine()
            or "unknown CPU")


def identity() -> str:
    """This CPU in one readable line, for cache keys and logs:
    'AMD EPYC (family 25 model 17 stepping 1) | isa 3f2a9c1e'. Not cached itself (its parts are),
    so that a test that fakes `isa_digest` sees it here."""
    info = cpuinfo()
    detail = " ".join(f"{word} {info[field]}" for field, word in IDENTIFYING if field in info)
    name = f"{model_name()} ({detail})" if detail else model_name()
    return f"{name} | isa {isa_digest()}"
