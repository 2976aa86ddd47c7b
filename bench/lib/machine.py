"""The machine a benchmark ran on: CPU model and ISA flags, PyTorch's and oneDNN's ISA level,
threads; its kind (`kind()`) names the reports in metrics/bench/."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

from bench.lib import ROOT
from rnnlab.kernels import choice

# ISA flags that decide which code is fast (as /proc/cpuinfo names them; macOS: none listed)
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_bf16", "asimd", "sve")


def cpu_flags() -> list[str]:
    """The ISA_FLAGS this CPU lists, in that order."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in ISA_FLAGS if f in flags]


def onednn_isa() -> str:
    """The ISA oneDNN dispatches to here, as its verbose log names it (a child process: the
    log is read once, at start-up)."""
    code = ("import torch; x = torch.randn(4, 8); w = torch.randn(8, 8); "
            "torch.ops.mkldnn._linear_pointwise(x, w, None, 'none', [], '')")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "ONEDNN_VERBOSE": "1"}, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in proc.stdout.splitlines():
        if ",isa:" in line:
            return line.split(",isa:", 1)[1].strip()
    return "unknown"


def machine_kind(cpu: str, flags: list[str]) -> str:
    """A file name for the kind of machine: its CPU model and the ISA that sets its speed, e.g.
    amd-epyc-avx2 or intel-xeon-platinum-8480c-avx512-amx."""
    isa = torch.backends.cpu.get_cpu_capability().lower().replace("_", "-")
    extra = "-amx" if "amx_tile" in flags else "-bf16" if "avx512_bf16" in flags else ""
    name = cpu.lower().replace("(r)", "").replace("(tm)", "")
    slug = "".join(c if c.isalnum() else "-" for c in name)
    return "-".join(part for part in slug.split("-") if part) + f"-{isa}{extra}"


def kind() -> str:
    """This machine's kind (`machine_kind`): the name of its reports in metrics/bench/."""
    return machine_kind(choice.cpu_model(), cpu_flags())


def machine() -> dict:
    """Everything a report says about the machine, its kind included."""
    cpu, flags = choice.cpu_model(), cpu_flags()

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else "unknown"

    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "flags": flags, "kind": machine_kind(cpu, flags),
            "torch_isa": torch.backends.cpu.get_cpu_capability(),
            "onednn_isa": onednn_isa() if onednn_available() else "none",
            "load_average": os.getloadavg()[0],  # other work on the machine: 0 is quiet
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onednn": onednn_available(), "python": platform.python_version(),
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
