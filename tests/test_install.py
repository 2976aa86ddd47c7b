"""A non-editable install works: the wheel holds the whole package, bundled corpus included, and
the real download and tokenize stages run on the installed copy from a folder without rnnlab/."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from rnnlab.codedeps import closure

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Where each module named on the command line is imported from, one file a line.
WHERE = "import importlib, sys\nfor m in sys.argv[1:]: print(importlib.import_module(m).__file__)"


def run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of the working tree, built from a copy (pip builds in place: no build/ in the repo)."""
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT / "rnnlab", tmp / "src/rnnlab", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp / "src" / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), str(tmp / "src")])
    [whl] = (tmp / "dist").glob("rnnlab-*.whl")
    return whl


def test_the_wheel_holds_every_module_the_bundled_corpus_and_the_time_loop_s_source(wheel):
    tracked = run(["git", "ls-files", "rnnlab"], cwd=ROOT).stdout.split()
    wanted = {f for f in tracked if f.endswith((".py", ".cpp"))} | {"rnnlab/corpora/timemachine.txt"}
    assert "rnnlab/kernels/csrc/recurrence.cpp" in wanted  # an installed package compiles it too
    missing = sorted(wanted - set(zipfile.ZipFile(wheel).namelist()))
    assert not missing, f"{wheel.name} lacks {missing}: see [tool.setuptools] in pyproject.toml"


def test_the_stages_run_on_the_installed_package(wheel, tmp_path):
    site, work = tmp_path / "site", tmp_path / "work"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)])
    shutil.copytree(ROOT / "stages", work / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["max_tokens"] = 1000
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(site)}

    run([sys.executable, "-m", "stages.download", "--params", "params.yaml", "--out", "raw"], cwd=work, env=env)
    out = run([sys.executable, "-m", "stages.tokenize", "--params", "params.yaml", "--raw", "raw", "--out", "tokens"],
              cwd=work, env=env).stdout
    assert "timemachine" in out and (work / "tokens/vocab.json").is_file()
    # the compiled time loop's source is where the installed rnnlab/kernels/native.py looks for it
    source = run([sys.executable, "-c", "from rnnlab.kernels import native; print(native.SOURCE)"],
                 cwd=work, env=env).stdout.strip()
    assert Path(source).is_relative_to(site) and Path(source).is_file()
    # The bundled text was read from the installed package.
    assert Path(json.loads((work / "raw/source.json").read_text())["source"]).is_relative_to(site)

    # Every rnnlab module the stages import comes from site/, not from the checkout: a dev venv's
    # editable install would otherwise supply any submodule that the wheel lacks, silently.
    modules = sorted({f.removesuffix("/__init__.py").removesuffix(".py").replace("/", ".")
                      for stage in ("stages.download", "stages.tokenize")
                      for f in closure(stage, ROOT) if f.startswith("rnnlab/")})
    assert "rnnlab.corpora" in modules
    files = run([sys.executable, "-c", WHERE, *modules], cwd=work, env=env).stdout.split()
    assert len(files) == len(modules) and all(Path(f).is_relative_to(site) for f in files), files

    # ... and that check sees a subpackage missing from site/ (an ImportError, or a file elsewhere).
    shutil.rmtree(site / "rnnlab/corpora")
    broken = subprocess.run([sys.executable, "-c", WHERE, *modules], cwd=work, env=env, capture_output=True, text=True)
    assert broken.returncode != 0 or not all(Path(f).is_relative_to(site) for f in broken.stdout.split())
