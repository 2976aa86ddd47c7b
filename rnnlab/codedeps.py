"""The project files a module imports, transitively, read from the code with `ast` (nothing runs).

    python -m rnnlab.codedeps stages.train     # its files, one a line: the code deps of dvc.yaml

Every import counts, wherever it is: at the top, inside a function (a lazy import), under
`if TYPE_CHECKING:`, in a `try`. Importing `rnnlab.x` runs `rnnlab/__init__.py`, so each
package's `__init__.py` on the way counts too. This over-approximates what one run executes,
which is what a DVC dep or a code fingerprint needs. Not seen: modules named by a string
(`importlib.import_module("rnnlab.x")`). tests/test_deps.py checks dvc.yaml's deps against it.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
from pathlib import Path

from rnnlab.errors import UserError, run_main

PACKAGES = ("rnnlab", "stages")  # top-level names of the project's own code; other imports are ignored


def closure(module: str, root: Path | str, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """The files of `module` and of every project module it imports, transitively: sorted paths
    relative to `root`, posix style, e.g. ['rnnlab/__init__.py', ..., 'stages/train.py']."""
    root = Path(root)
    if module.split(".")[0] not in packages or _file(module, root) is None:
        raise UserError(f"no module {module!r} under {root} (project packages: {', '.join(packages)})")
    seen: set[str] = set()    # modules visited
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:      # a cycle, or a module reached twice
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)  # a package's __init__.py runs before its modules
        path = _file(name, root)
        if path is not None:
            files.add(path)
            todo += [m for m in _imports(path, name, root) if m.split(".")[0] in packages]
    return sorted(p.relative_to(root).as_posix() for p in files)


def digest(module: str, root: Path | str, packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """{relative path: sha1 of its bytes} over `closure(module, root)`: a fingerprint of the code
    a run of `module` executes."""
    root = Path(root)
    return {rel: hashlib.sha1((root / rel).read_bytes()).hexdigest()
            for rel in closure(module, root, packages)}


def _file(module: str, root: Path) -> Path | None:
    """The file that defines `module` under `root`: a package's __init__.py (which wins, as in
    Python) or a .py file; None if neither exists (or for a namespace package)."""
    base = root.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_name(base.name + ".py")):
        if path.is_file():
            return path
    return None


def _imports(path: Path, module: str, root: Path) -> list[str]:
    """Absolute names of every module that the code of `module` (at `path`) may import.

    `from a import b` names `a`, and `a.b` as well (it is kept only if a file defines it, which
    is when b is a submodule rather than a name defined in a)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    # The package that a relative import starts from: the module itself for an __init__.py.
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..a import b
                if node.level > len(package):
                    continue  # above the top package: Python refuses it too
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names
                      if alias.name != "*" and _file(f"{base}.{alias.name}", root) is not None]
    return names


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Print the project files that a module imports, transitively (the code deps of its DVC stage).")
    parser.add_argument("modules", nargs="+", metavar="MODULE", help="a module name, e.g. stages.train")
    parser.add_argument("--root", default=".", help="the repository root (default: the current directory)")
    parser.add_argument("--sha1", action="store_true", help="print each file's sha1 before its path")
    args = parser.parse_args()

    for module in args.modules:
        if len(args.modules) > 1:
            print(f"# {module}")
        if args.sha1:
            for rel, sha1 in digest(module, args.root).items():
                print(f"{sha1}  {rel}")
        else:
            print("\n".join(closure(module, args.root)))


if __name__ == "__main__":
    run_main(main)
