"""dvc.yaml's code deps are exactly the project files each stage imports (rnnlab/codedeps.py);
and that closure, on a tiny fake package with known answers."""

import hashlib
import re
from pathlib import Path

import pytest
import yaml

from rnnlab.codedeps import PACKAGES, closure, digest
from rnnlab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages by name; a `foreach` stage by its `do` template (deps with ${key})."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def code_problems(stage: dict, root: Path, packages: tuple[str, ...] = PACKAGES) -> tuple[list[str], list[str]]:
    """(files the stage's modules import that no dep covers, code deps that cover none of them).

    The modules are those its cmd runs (`python -m stages.train`). A listed folder covers the
    files under it. Only code deps can be stale: a .py file, or a folder of a project package
    (`rnnlab/corpora`); data (`data/tokens`, `models/${key}`, a .txt) is not judged."""
    modules = re.findall(r"python -m ([\w.]+)", stage["cmd"])
    code = sorted({f for m in modules for f in closure(m, root, packages)})
    deps = stage.get("deps", [])

    def covers(dep: str, path: str) -> bool:
        return path == dep or path.startswith(dep.rstrip("/") + "/")

    def is_code(dep: str) -> bool:
        return "${" not in dep and (
            dep.endswith(".py") or (dep.split("/")[0] in packages and not (root / dep).is_file()))

    missing = [f for f in code if not any(covers(d, f) for d in deps)]
    stale = [d for d in deps if is_code(d) and not any(covers(d, f) for f in code)]
    return missing, stale


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_stage_deps_list_exactly_the_code_it_imports(name):
    stage = dvc_stages()[name]
    missing, stale = code_problems(stage, ROOT)
    modules = " ".join(re.findall(r"python -m ([\w.]+)", stage["cmd"]))
    problems = []
    if missing:
        problems.append("imports these files, which its deps do not list:\n" + "".join(f"  - {f}\n" for f in missing))
    if stale:
        problems.append("lists these deps, which it does not import:\n" + "".join(f"  - {d}\n" for d in stale))
    if problems:
        pytest.fail(f"dvc.yaml, stage {name!r} ({modules}) " + "and ".join(problems)
                    + f"(`python -m rnnlab.codedeps {modules}` prints the files it imports)", pytrace=False)


def test_every_stage_runs_a_project_module():
    for name, stage in dvc_stages().items():
        assert re.search(r"python -m stages\.\w+", stage["cmd"]), f"stage {name!r}: no `python -m stages.X` in its cmd"


# A tiny package: every kind of import, a cycle, a module nobody imports, and an outside package.
FAKE = {
    "pkg/__init__.py": "NAME = 'pkg'\n",
    "pkg/main.py": (
        "from __future__ import annotations\n"
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "import other\n"                       # outside the project packages: ignored
        "from . import rel\n"                  # relative, a submodule
        "from pkg import sub, NAME\n"          # a submodule and a name of pkg/__init__.py
        "from pkg.util import helper\n"        # a name in a module, not a file
        "if TYPE_CHECKING:\n"
        "    from pkg.typing_only import T\n"
        "def lazy():\n"
        "    import pkg.deep.lazy\n"           # lazy, through the subpackage's __init__.py
    ),
    "pkg/rel.py": "from .cycle_a import A\n",
    "pkg/cycle_a.py": "from pkg.cycle_b import B\nA = 1\n",
    "pkg/cycle_b.py": "from . import cycle_a\nB = 2\n",
    "pkg/sub.py": "",
    "pkg/util.py": "def helper():\n    pass\n",
    "pkg/typing_only.py": "T = int\n",
    "pkg/deep/__init__.py": "from . import leaf\n",   # relative from an __init__.py: pkg.deep.leaf
    "pkg/deep/leaf.py": "",
    "pkg/deep/lazy.py": "from .. import util\nfrom ..sub import *\n",
    "pkg/unused.py": "import pkg.main\n",
    "other/__init__.py": "import pkg.unused\n",
}
MAIN = ["pkg/__init__.py", "pkg/cycle_a.py", "pkg/cycle_b.py", "pkg/deep/__init__.py", "pkg/deep/lazy.py",
        "pkg/deep/leaf.py", "pkg/main.py", "pkg/rel.py", "pkg/sub.py", "pkg/typing_only.py", "pkg/util.py"]


@pytest.fixture
def fake(tmp_path):
    for rel, text in FAKE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize("module, files", [
    ("pkg.main", MAIN),
    ("pkg.cycle_a", ["pkg/__init__.py", "pkg/cycle_a.py", "pkg/cycle_b.py"]),
    ("pkg.cycle_b", ["pkg/__init__.py", "pkg/cycle_a.py", "pkg/cycle_b.py"]),
    ("pkg.deep.lazy", ["pkg/__init__.py", "pkg/deep/__init__.py", "pkg/deep/lazy.py", "pkg/deep/leaf.py",
                       "pkg/sub.py", "pkg/util.py"]),
    ("pkg.deep", ["pkg/__init__.py", "pkg/deep/__init__.py", "pkg/deep/leaf.py"]),
    ("pkg", ["pkg/__init__.py"]),
    ("pkg.unused", sorted(MAIN + ["pkg/unused.py"])),
])
def test_closure_known_answers(fake, module, files):
    assert closure(module, fake, packages=("pkg",)) == files


def test_closure_follows_every_project_package(fake):
    assert closure("pkg.main", fake, packages=("pkg", "other")) == sorted(MAIN + ["other/__init__.py", "pkg/unused.py"])


def test_a_module_that_is_not_there_is_named(fake):
    with pytest.raises(UserError, match=r"no module 'pkg\.nope'"):
        closure("pkg.nope", fake, packages=("pkg",))
    with pytest.raises(UserError, match=r"no module 'os'"):
        closure("os", fake, packages=("pkg",))


def test_digest_is_the_sha1_of_each_file_of_the_closure(fake):
    d = digest("pkg.cycle_a", fake, packages=("pkg",))
    assert d == {rel: hashlib.sha1(FAKE[rel].encode()).hexdigest()
                 for rel in ["pkg/__init__.py", "pkg/cycle_a.py", "pkg/cycle_b.py"]}
    (fake / "pkg/cycle_b.py").write_text(FAKE["pkg/cycle_b.py"] + "# edited\n")
    again = digest("pkg.cycle_a", fake, packages=("pkg",))
    assert [rel for rel in d if d[rel] != again[rel]] == ["pkg/cycle_b.py"]


def test_code_problems_finds_missing_and_stale_deps(fake):
    # pkg.deep.lazy imports pkg/__init__.py, pkg/deep/*.py, pkg/sub.py and pkg/util.py
    stage = {"cmd": "python -m pkg.deep.lazy --out models/${key}",
             "deps": ["data/raw", "models/${key}", "other", "pkg/deep", "pkg/util.py", "pkg/sub.py"]}
    assert code_problems(stage, fake, ("pkg",)) == (["pkg/__init__.py"], [])
    (fake / "pkg/empty").mkdir()
    (fake / "pkg/data.txt").write_text("not code")
    stage["deps"] += ["pkg/__init__.py", "pkg/data.txt", "pkg/main.py", "pkg/gone.py", "pkg/gone", "pkg/empty"]
    assert code_problems(stage, fake, ("pkg",)) == ([], ["pkg/main.py", "pkg/gone.py", "pkg/gone", "pkg/empty"])
