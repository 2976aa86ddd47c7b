"""rnnlab/codedeps.py: the project files a module imports, on a tiny fake package with known answers."""

import hashlib

import pytest

from rnnlab.codedeps import closure, digest
from rnnlab.errors import UserError

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

