"""The time loops of rnnlab/kernels/fused.py's recurrences compiled, the loop over steps in C++
(rnnlab/kernels/csrc/recurrence.cpp): `NativeTanh` and `NativeGRU` are `TanhRecurrence` and
`GRURecurrence` (the same function, gradients and contracts); `NativeLSTM` is nn.LSTM's
recurrence, with nn.LSTM as its fallback. Why: from Python a step is ~20 small torch ops, which
at a batch of 32 cost more than its one product; here it is that product and one vectorized pass.

`load()` builds the library once per machine with the system C++ compiler (-march=native) into
`library_path()`, outside the repository, and loads it. It is False, and `why_not()` says why,
without a compiler, when the build or the load fails, or under RNNLAB_NATIVE=0: then the fused
path runs; nothing here raises. A build's name holds its target ISA and inputs, so a cluster's
nodes may share the folder; `prune` removes unused builds. `python -m rnnlab.kernels.native
build` builds ahead (make setup).
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from torch.autograd.function import once_differentiable

from rnnlab.fileio import cache_dir
from rnnlab.kernels import cpu

SOURCE = Path(__file__).resolve().parent / "csrc" / "recurrence.cpp"
DISABLE_ENV = "RNNLAB_NATIVE"  # "0": never load (the fused path runs)
# Code generation; the include and library paths, the ABI define and the libraries are added by
# `_command`. -march=native: built where it runs (the file name holds the target). -fno-math-errno
# -fno-trapping-math (as torch's own build): without them GCC vectorizes none of the gate loops
# (the clamps in the source's exp); they change no result. No -ffast-math: that exp relies on IEEE
# rounding, and fast-math gained nothing measurable. -fopenmp: the C++ runs small batches on a team
# of threads (torch's own OpenMP runtime, already loaded). -w: torch's headers warn.
CXXFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp",
            "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w"]
LIBS = ["-lc10", "-ltorch", "-ltorch_cpu"]
BUILD_TIMEOUT = 900  # seconds: a compiler that hangs is a failure, not a hung training run
LOCK_TIMEOUT = 1200  # seconds to wait for another process's build
STALE_DAYS = 30  # a build (or leftover) nobody loaded for this long is removed by `prune`
SUPERSEDED_DAYS = 1  # this target's builds of other inputs: removed once unused for this long
PREFIX = "recurrence-"  # every file of native/ this module writes starts with it

_why_not = ""  # why the last build or load failed, one line
_build_log = ""  # the compiler's full output of the last failed build
_loaded: Path | None = None  # the library this process loaded (a namespace registers once)


def why_not() -> str:
    """Why the native path is off, in one line ('' while nothing failed)."""
    return _why_not


def build_log() -> str:
    """The compiler's output of the last failed build ('' if none)."""
    return _build_log


def disabled() -> bool:
    """Whether RNNLAB_NATIVE=0 turns the compiled path off."""
    return os.environ.get(DISABLE_ENV, "").strip() == "0"


def target_digest() -> str:
    """8 hex digits for what -march=native code is built for here: the compiler's macro set (the
    target ISA and the compiler's version). The first part of a build's name, so that this
    machine's builds are recognisable in a folder other machines share."""
    return cpu.digest(cpu.native_macros() or "no compiler")


def build_key() -> str:
    """16 hex digits for everything the library depends on: the source, torch (version, folder),
    the compiler's command, its flags, the C++ ABI and the target (the -march=native macro set)."""
    return _build_key(SOURCE, cpu.compiler(), cpu.native_macros() or "no compiler")


@functools.cache
def _build_key(source: Path, command: tuple[str, ...], macros: str) -> str:
    """build_key() for its inputs; cached, as kernel choices ask for it on every decision."""
    key = "\n".join([source.read_text(encoding="utf-8"), torch.__version__,
                     str(Path(torch.__file__).parent), " ".join(command),
                     " ".join(CXXFLAGS + LIBS), str(torch._C._GLIBCXX_USE_CXX11_ABI), macros])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def library_path() -> Path:
    """Where this machine's build of this source, torch and compiler lives (present or not):
    native/recurrence-<target_digest>-<build_key>.so in the cache folder."""
    return cache_dir() / "native" / f"{PREFIX}{target_digest()}-{build_key()}.so"


def _command(source: Path, out: Path) -> list[str]:
    """The compiler's command line for `source` -> `out`: run directly (no ninja, no setuptools
    build), against torch's headers and libraries."""
    from torch.utils import cpp_extension  # imports setuptools: only when building

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = cpp_extension.library_paths()
    return [*cpu.compiler(), *CXXFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(source),
            "-o", str(out), *(f"-L{d}" for d in libdirs),
            *(f"-Wl,-rpath,{d}" for d in libdirs), *LIBS]


def _fail(reason: str, log: str = "") -> None:
    global _why_not, _build_log
    _why_not, _build_log = reason, log


def _first_error(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    line = (errors or lines or ["no output"])[0]
    return line if len(line) <= 300 else line[:297] + "..."


def build(verbose: bool = True, bad: os.stat_result | None = None) -> Path | None:
    """The compiled library's path, compiling it first if this machine's cache lacks it; None if
    it cannot be built (`why_not()` says why, `build_log()` holds the compiler's output). Never
    raises. verbose: say on stderr that it compiles, and show the compiler's errors. bad: the
    stat of the file at that path that failed to load: it is compiled again, unless another
    process has replaced it meanwhile. A file lock keeps two processes from building at once;
    the library appears by an atomic rename. After a build, `prune` tidies the folder."""
    try:
        target = library_path()
        if _usable(target, bad):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(target) + ".lock", timeout=LOCK_TIMEOUT):
                if _usable(target, bad):  # another process built it while we waited
                    return target
                built = _compile(target, verbose)
        except Timeout:
            _fail(f"another process held the build lock {target}.lock for {LOCK_TIMEOUT} s")
            return None
        if built is not None:
            prune(built)
        return built
    except Exception as err:  # noqa: BLE001 - a failed build means the fused path, not a crash
        _fail(f"build failed: {type(err).__name__}: {err}")
        return None


def _usable(target: Path, bad: os.stat_result | None) -> bool:
    """Whether `target` exists and is not the very file (same inode and time) that failed."""
    try:
        now = target.stat()
    except FileNotFoundError:
        return False
    return bad is None or (now.st_ino, now.st_mtime_ns) != (bad.st_ino, bad.st_mtime_ns)


def _compile(target: Path, verbose: bool) -> Path | None:
    fd, name = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        command = _command(SOURCE, tmp)
        if verbose:
            print(f"rnnlab: compiling {SOURCE.name} with {command[0]} (once per machine, "
                  "~30 s)", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
        except OSError as err:  # no such compiler
            _fail(f"C++ compiler {command[0]!r} did not run: {err.strerror or err}")
            return None
        except subprocess.TimeoutExpired:
            _fail(f"C++ compiler {command[0]!r} ran past {BUILD_TIMEOUT} s")
            return None
        if done.returncode != 0:
            log = done.stderr or done.stdout
            _fail(f"C++ compiler {command[0]!r} failed (exit {done.returncode}): "
                  f"{_first_error(log)}", log)
            if verbose:
                print(log, file=sys.stderr)
            return None
        tmp.chmod(0o755)  # mkstemp made it private; a library is as readable as any other
        os.replace(tmp, target)  # atomic: a reader sees the whole library or none
        return target
    finally:
        tmp.unlink(missing_ok=True)


def prune(current: Path) -> list[Path]:
    """Remove the builds in `current`'s folder that nobody needs; -> what was removed. This
    target's builds for other inputs (an old source, another torch: same <target>, other
    <build>) once unused for SUPERSEDED_DAYS, with their locks; any other file of ours (other
    targets' builds, temporary files a killed build left, locks) once unused for STALE_DAYS: a
    node that shares the folder touches its current build on every load, so that one stays.
    `current` and its lock stay. A file that cannot be removed stays too (another user's, a
    read-only folder)."""
    oldest = time.time() - STALE_DAYS * 86400
    superseded_before = time.time() - SUPERSEDED_DAYS * 86400
    mine = f"{PREFIX}{target_digest()}-"
    keep = {current.name, current.name + ".lock"}
    removed = []
    for path in current.parent.glob(f"{PREFIX}*"):
        if path.name in keep:
            continue
        superseded = path.name.startswith(mine) and not path.name.endswith(".tmp.so")
        if _last_used(path) < (superseded_before if superseded else oldest):
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed


def _last_used(path: Path) -> float:
    """When `path` was last used: its mtime; for a lock, the later of its own and its build's
    (a lock is only written when a build starts). Now if both are gone meanwhile."""
    paths = [path]
    if path.name.endswith(".so.lock"):
        paths.append(path.with_name(path.name.removesuffix(".lock")))
    return max((t for t in map(_mtime, paths) if t is not None), default=time.time())


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile
        return None


def _load_library(path: Path) -> bool:
    """Load `path` into torch.ops and check that its ops registered; False (why_not says why)
    if either fails."""
    try:
        torch.ops.load_library(str(path))
        torch.ops.rnnlab.gru_backward  # noqa: B018 - raises if the library did not register
    except Exception as err:  # noqa: BLE001
        _fail(f"loading {path} failed: {type(err).__name__}: {_first_error(str(err))}")
        return False
    return True


def _touch(path: Path) -> None:
    """Mark `path` used now (its mtime), so that `prune` on a node sharing the folder keeps it.
    A read-only cache only loses that mark."""
    try:
        os.utime(path)
    except OSError:
        pass


@functools.cache
def load() -> bool:
    """Whether the ops torch.ops.rnnlab.* are there, building and loading them if needed; once
    per process. A library that does not load is compiled again once. False if RNNLAB_NATIVE=0
    or anything fails (`why_not()` says why)."""
    global _loaded
    if disabled():
        _fail(f"{DISABLE_ENV}=0")
        return False
    if _loaded is not None:
        return True
    path = build(verbose=True)
    if path is None:
        return False
    if not _load_library(path):
        first = why_not()
        try:
            bad = path.stat()
        except OSError:
            bad = None  # gone meanwhile: whatever is there now is someone's new build
        print(f"rnnlab: {first}; compiling it again", file=sys.stderr, flush=True)
        path = build(verbose=True, bad=bad)
        if path is None:
            return False
        if not _load_library(path):
            _fail(f"{why_not()} (after compiling it again)")
            return False
    _loaded = path
    _touch(path)
    _fail("")  # a failure before this one no longer holds
    return True


class NativeTanh(torch.autograd.Function):
    """fused.TanhRecurrence compiled: h_t = tanh(g_t + h_{t-1} W_hh^T). g (steps, batch, hidden)
    holds the input projection and both biases. -> every h_t (steps, batch, hidden), the last."""

    @staticmethod
    def forward(ctx, g, h0, w_hh):
        hs = torch.ops.rnnlab.tanh_forward(g, h0, w_hh)  # h_0 .. h_steps
        ctx.save_for_backward(hs, w_hh)
        return hs[1:], hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_last):
        hs, w_hh = ctx.saved_tensors
        return tuple(torch.ops.rnnlab.tanh_backward(d_out, d_last, hs, w_hh))


class NativeGRU(torch.autograd.Function):
    """fused.GRURecurrence compiled: nn.GRU's recurrence, gates (r, z, n) stacked as nn.GRU does;
    gi (steps, batch, 3*hidden) = x W_ih^T + b_ih. -> every h_t (steps, batch, hidden), the last."""

    @staticmethod
    def forward(ctx, gi, h0, w_hh, b_hh):
        hs, gates = torch.ops.rnnlab.gru_forward(gi, h0, w_hh, b_hh)  # gates: r, z, n, gh_n
        ctx.save_for_backward(hs, gates, w_hh)
        return hs[1:], hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_last):
        hs, gates, w_hh = ctx.saved_tensors
        return tuple(torch.ops.rnnlab.gru_backward(d_out, d_last, hs, gates, w_hh))


class NativeLSTM(torch.autograd.Function):
    """nn.LSTM's recurrence compiled, gates (i, f, g, o) stacked as nn.LSTM does;
    gi (steps, batch, 4*hidden) = x W_ih^T + b_ih + b_hh. -> every h_t (steps, batch, hidden),
    the last h, the last c. No Python twin in fused.py: where this cannot run, nn.LSTM does."""

    @staticmethod
    def forward(ctx, gi, h0, c0, w_hh):
        hs, cs, gates = torch.ops.rnnlab.lstm_forward(gi, h0, c0, w_hh)  # gates: i, f, g, o, tanh c
        ctx.save_for_backward(hs, cs, gates, w_hh)
        return hs[1:], hs[-1].clone(), cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h, d_c):
        hs, cs, gates, w_hh = ctx.saved_tensors
        return tuple(torch.ops.rnnlab.lstm_backward(d_out, d_h, d_c, hs, cs, gates, w_hh))


RECURRENCES = {"rnn": NativeTanh, "gru": NativeGRU, "lstm": NativeLSTM}  # as fused.RECURRENCES


def main(argv: list[str] | None = None) -> int:
    """`python -m rnnlab.kernels.native build`: build (or find) the library, one line; exit 0
    either way: a machine without a compiler still sets up, and trains on the fused path."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["build"]:
        print("usage: python -m rnnlab.kernels.native build", file=sys.stderr)
        return 2
    start = time.perf_counter()
    path = build(verbose=True)
    seconds = time.perf_counter() - start
    if path is None:
        print(f"rnnlab native: not built ({why_not()}); training uses the fused path")
    else:
        print(f"rnnlab native: {path} ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
