"""The text around the code states what is true now:
- every repository path that README.md, docs/, deploy/README.md, or a docstring or comment of a
  tracked Python file names exists (in git, or as an output the pipeline writes: the Makefile's
  `clean` target lists those);
- every relative link of those Markdown files reaches a file;
- every `make` target and `rnnlab` subcommand that README.md and docs/ name exists;
- the `RNNLAB_*` variables that the code reads are exactly those in docs/environment.md's table.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import subprocess
import tokenize
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_TABLE = "docs/environment.md"
# Written at run time, never tracked, beyond the pipeline's outputs (`make clean`): the MLflow
# store, DVC's local config and cache, the team stack's folder, the UI test's packages.
OTHER_OUTPUTS = ("mlflow.db", "mlruns", ".dvc/config.local", ".dvc/cache", ".dvc/tmp", ".team",
                 ".venv", "tests/ui/node_modules", "deploy/.env")


@cache
def tracked() -> frozenset[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return frozenset(out.stdout.split())


@cache
def folders() -> frozenset[str]:
    return frozenset(str(p) for f in tracked() for p in PurePosixPath(f).parents if str(p) != ".")


@cache
def outputs() -> tuple[str, ...]:
    """What the pipeline writes: the paths `make clean` removes, and OTHER_OUTPUTS."""
    clean = re.search(r"^clean:.*\n\trm -rf (.*)$", (ROOT / "Makefile").read_text(), re.M)
    return tuple(clean.group(1).split()) + OTHER_OUTPUTS


@cache
def top_level() -> frozenset[str]:
    return frozenset(f.split("/")[0] for f in tracked())


def exists(path: str) -> bool:
    """A tracked file or folder, a glob over them (`<x>`, `{x}`, `*` stand for any name), or under
    an output of the pipeline."""
    path = path.rstrip("/")
    if path in tracked() or path in folders():
        return True
    if any(path == o or path.startswith(o.rstrip("/") + "/") for o in outputs()):
        return True
    if re.search(r"[<{*]", path):
        pattern = re.sub(r"<[^>]*>|\{[^}]*\}", "*", path)
        return any(PurePosixPath(f).match(pattern) or PurePosixPath(d).match(pattern)
                   for f in tracked() for d in [str(PurePosixPath(f).parent)])
    return False


def path_pattern() -> re.Pattern:
    """A path that starts with a top-level entry of the repository, e.g. `rnnlab/config.py`,
    `docs/`, `params.yaml`; not inside a URL or another path (no `/`, `.`, word before it)."""
    names = "|".join(sorted((re.escape(n) for n in top_level()), key=len, reverse=True))
    part = r"(?:<[^<>\n]*>|\{[^{}\n]*\}|[\w.*-])*(?:<[^<>\n]*>|\{[^{}\n]*\}|[\w*])"
    return re.compile(rf"(?<![\w./~$-])(?:{names})(?:(?:/{part})+/?|/|(?![\w/.-]))")


def named_paths(text: str) -> list[str]:
    found = []
    for match in path_pattern().finditer(text):
        path = match.group(0).rstrip(".")
        if "/" not in path and path not in {n for n in top_level() if "." in n}:
            continue  # a bare word such as `data` or `docs` said as a word, not a path
        found.append(path)
    return found


def python_text(path: Path) -> str:
    """The docstrings and comments of a Python file, one after another."""
    source = path.read_text()
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append(ast.get_docstring(node, clean=False) or "")
    return "\n".join(parts)


def markdown_files() -> list[str]:
    return sorted(f for f in tracked() | {ENV_TABLE} if (ROOT / f).exists()
                  and (f in ("README.md", "deploy/README.md") or re.fullmatch(r"docs/[^/]+\.md", f)))


def prose_sources() -> dict[str, str]:
    """Each file whose text is checked, with that text."""
    texts = {f: (ROOT / f).read_text() for f in markdown_files()}
    texts.update({f: python_text(ROOT / f) for f in sorted(tracked())
                  if f.endswith(".py") and f != "tests/test_docs.py"})
    return texts


def test_every_path_named_in_the_docs_docstrings_and_comments_exists():
    stale = [f"{source}: {path}" for source, text in prose_sources().items()
             for path in dict.fromkeys(named_paths(text)) if not exists(path)]
    assert not stale, f"{len(stale)} path(s) named that do not exist:\n" + "\n".join(stale)


def test_every_relative_link_of_the_markdown_reaches_a_file():
    broken = []
    for doc in markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / doc).read_text()):
            if re.match(r"[a-z]+:|#", target):
                continue
            resolved = (ROOT / doc).parent / target.split("#")[0]
            relative = resolved.resolve().relative_to(ROOT).as_posix()
            if not exists(relative):
                broken.append(f"{doc}: ({target})")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def rnnlab_commands() -> set[str]:
    from rnnlab.cli.main import COMMANDS

    sub = argparse.ArgumentParser().add_subparsers()
    for command in COMMANDS:
        command.add_parser(sub)
    return set(sub.choices)


def code_in(markdown: str) -> str:
    """The fenced blocks and `inline code` of a Markdown text: where commands are written."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.M | re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S))
    return "\n".join(blocks + spans)


def test_every_make_target_and_rnnlab_command_the_docs_name_exists():
    code = "\n".join(code_in((ROOT / f).read_text()) for f in markdown_files())
    command = r"(?:^\s*(?:\$ )?|(?<=&& )|(?<=; ))"  # where a shell command starts
    make = set(re.findall(command + r"make ([a-z][\w-]*)", code, re.M))
    commands = set(re.findall(command + r"rnnlab ([a-z][\w-]*)", code, re.M))
    assert make and commands, "the docs name no make target or rnnlab command: the patterns broke"
    assert make <= makefile_targets(), f"not in the Makefile: {sorted(make - makefile_targets())}"
    missing = commands - rnnlab_commands()
    assert not missing, f"not rnnlab subcommands: {sorted(missing)}"


def env_names_in_code() -> set[str]:
    """`RNNLAB_*` names that code outside tests reads or sets for its own processes, and the suite's
    switches in tests/conftest.py: string literals and keyword names in Python, words in the
    Makefile and .ci/run."""
    name = re.compile(r"RNNLAB_[A-Z0-9_]+")
    found: set[str] = set()
    for f in tracked():
        if f.endswith(".py") and (not f.startswith("tests/") or f == "tests/conftest.py"):
            for node in ast.walk(ast.parse((ROOT / f).read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and name.fullmatch(node.value):
                    found.add(node.value)
                elif isinstance(node, ast.keyword) and node.arg and name.fullmatch(node.arg):
                    found.add(node.arg)
    for f in ("Makefile", ".ci/run"):
        found.update(name.findall((ROOT / f).read_text()))
    return found


def env_names_in_table() -> set[str]:
    rows = re.findall(r"^\|\s*`(RNNLAB_[A-Z0-9_]+)`\s*\|", (ROOT / ENV_TABLE).read_text(), re.M)
    assert len(rows) == len(set(rows)), f"a variable has two rows in {ENV_TABLE}"
    return set(rows)


def test_every_rnnlab_variable_the_code_reads_is_in_one_table_and_only_those():
    if not (ROOT / ENV_TABLE).exists():
        pytest.fail(f"{ENV_TABLE}: no table of the RNNLAB_* variables")
    code, table = env_names_in_code(), env_names_in_table()
    assert code - table == set(), f"read by the code, not in {ENV_TABLE}: {sorted(code - table)}"
    assert table - code == set(), f"in {ENV_TABLE}, read by no code: {sorted(table - code)}"


@pytest.mark.parametrize("text, paths", [
    ("see rnnlab/config.py and `docs/`.", ["rnnlab/config.py", "docs/"]),
    ("https://github.com/x/y/tree/main/rnnlab/config.py", []),
    ("~/.cache/rnnlab and /tmp/rnnlab/x", []),
    ("params.yaml's train; metrics/<cpu-kind>.md", ["params.yaml", "metrics/<cpu-kind>.md"]),
    ("metrics/bench/<machine kind>.md.", ["metrics/bench/<machine kind>.md"]),
    ("the data and the docs", []),
])
def test_paths_are_found_in_text_as_a_reader_sees_them(text, paths):
    assert named_paths(text) == paths


@pytest.mark.parametrize("path, found", [
    ("rnnlab/config.py", True), ("rnnlab/", True), ("rnnlab/nothing.py", False),
    ("metrics/report.md", True), ("tests/test_nothing.py", False), ("rnnlab/*/__init__.py", True),
    ("docs/<name>.md", True), ("tests/<area>/test_nothing.py", False),
])
def test_a_path_exists_when_git_or_the_pipeline_has_it(path, found):
    assert exists(path) is found
