"""Refresh requirements.lock from pyproject.toml: `make lock` (README: Dependencies).

The lock pins every package that `pip install -e '.[dev,team,cluster]'` needs, each with the
sha256 of every file of its version, resolved for CPython 3.11 on Linux x86_64 (our machines and
CI). All but torch, whose file differs between machines (a local CPU wheel, PyTorch's CPU index,
PyPI's CUDA build): `make setup` installs it by its pin. torch is still resolved, against its CPU
wheel from TORCH_WHEELS (a folder, default /opt/wheels where it holds one, or a page of links,
else https://download.pytorch.org/whl/cpu/torch/), so that its dependencies are locked and no
nvidia-* package enters. uv resolves, keeping every version of the current lock that still fits:
a new or changed pin moves only what it needs. The lock pins uv too: `make setup` installs with it.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

UV = "uv==0.13.8"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
EXTRAS = ("dev", "team", "cluster")
ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
CPU_TORCH_PAGE = "https://download.pytorch.org/whl/cpu/torch/"
# torch's CUDA build pulls these in (several GB); the CPU wheel does not.
CUDA = re.compile(r"^(nvidia-|cuda-|triton==)")


def header(project: dict) -> str:
    """The requirements the lock was made from: tests/test_lock.py checks they still match."""
    lines = [
        "# requirements.lock: every package `pip install -e '.[dev,team,cluster]'` needs, with the sha256 of",
        "# its files, for CPython 3.11 on Linux x86_64; torch is left out on purpose (README: Dependencies).",
        "# Made by `make lock` (tools/lock.py); do not edit by hand.",
        "# The requirements it was made from (tests/test_lock.py checks that pyproject.toml still has them):",
    ]
    lines += [f"#   build-system: {r}" for r in project["build-system"]["requires"]]
    lines += [f"#   dependencies: {r}" for r in project["project"]["dependencies"]]
    for extra in EXTRAS:
        lines += [f"#   {extra}: {r}" for r in project["project"]["optional-dependencies"][extra]]
    lines.append(f"#   tooling: {UV}")
    return "\n".join(lines) + "\n"


def torch_wheels(pin: str) -> str:
    given = os.environ.get("TORCH_WHEELS")
    if given:
        return given
    version = pin.split("==", 1)[1]
    return "/opt/wheels" if glob.glob(f"/opt/wheels/torch-{version}+cpu-*.whl") else CPU_TORCH_PAGE


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch = [r for r in project["project"]["dependencies"] if re.match(r"torch\s*==", r)]
    if len(torch) != 1:
        sys.exit("pyproject.toml must pin torch with == (make setup installs it by that pin)")
    wheels = torch_wheels(torch[0])
    with tempfile.TemporaryDirectory() as tmp:
        venv.create(tmp, with_pip=True)
        subprocess.run([f"{tmp}/bin/pip", "install", "-q", UV], check=True)
        # the build backend (make setup installs the project with --no-build-isolation) and uv
        extra = Path(tmp, "extra.txt")
        extra.write_text("\n".join([*project["build-system"]["requires"], UV]) + "\n")
        out = Path(tmp, "lock.txt")
        if LOCK.exists():  # uv keeps the versions of its output file where they still fit:
            out.write_text(LOCK.read_text())  # a new pin changes what it needs, nothing else
        subprocess.run(
            [f"{tmp}/bin/uv", "pip", "compile", "pyproject.toml", str(extra),
             *[f"--extra={e}" for e in EXTRAS],
             "--generate-hashes", "--no-header", "--quiet",
             f"--python-version={PYTHON_VERSION}", f"--python-platform={PLATFORM}",
             f"--find-links={wheels}", "--no-emit-package=torch", f"--output-file={out}"],
            cwd=ROOT, check=True)
        body = out.read_text()
    cuda = [line.split()[0] for line in body.splitlines() if CUDA.match(line)]
    if cuda:
        sys.exit(f"torch resolved to its CUDA build ({cuda[0]} ...): give its CPU wheel with "
                 f"TORCH_WHEELS=<folder or page of links> (tried {wheels}); the lock is unchanged")
    LOCK.write_text(header(project) + body.replace(str(extra), "tools/lock.py"))
    print(f"wrote {LOCK.name}: {sum(1 for l in body.splitlines() if re.match(r'[A-Za-z0-9]', l))} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
