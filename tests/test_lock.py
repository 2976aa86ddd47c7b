"""requirements.lock agrees with pyproject.toml (README: Dependencies): every pin at its version,
every entry with hashes, torch deliberately left out, the header's record of the requirements it was
made from still pyproject's; the lock holds every dependency of what it installs, extras included;
and each check, on a broken copy, fails. No network: `make lock` refreshes the lock."""

import importlib.util
import platform
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("dev", "team")  # what `make setup` installs: '.[dev,team]'
HEADER = re.compile(r"#   (build-system|dependencies|dev|team|tooling): (.+)")
ENTRY = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(?: ; [^\\]+)?(?: \\)?")
HASH = re.compile(r" +--hash=sha256:[0-9a-f]{64}(?: \\)?")
CUDA = re.compile(r"nvidia-|cuda-|triton$")  # torch's CUDA build pulls these in, the CPU wheel none


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tooling_pin() -> str:
    """tools/lock.py's uv pin, which it adds to the lock for `make setup` to install with."""
    spec = importlib.util.spec_from_file_location("lock_tool", ROOT / "tools/lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UV


def requirements(pyproject: dict) -> dict[str, list[str]]:
    """pyproject.toml's requirements as the lock's header records them, by section."""
    return {"build-system": pyproject["build-system"]["requires"],
            "dependencies": pyproject["project"]["dependencies"],
            **{extra: pyproject["project"]["optional-dependencies"][extra] for extra in EXTRAS}}


def read_lock(text: str) -> tuple[dict[str, tuple[str, int]], dict[str, list[str]], list[str]]:
    """({name: (version, number of hashes)}, the header's requirements by section, problems of form)."""
    entries, header, problems, name = {}, {}, [], None
    for line in text.splitlines():
        if m := HEADER.fullmatch(line):
            header.setdefault(m[1], []).append(m[2])
        elif not line.strip() or line.lstrip().startswith("#"):
            continue
        elif m := ENTRY.fullmatch(line):
            name = canonical(m[1])
            if name in entries:
                problems.append(f"{name} is in the lock twice")
            entries[name] = (m[2], 0)
        elif HASH.fullmatch(line) and name:
            entries[name] = (entries[name][0], entries[name][1] + 1)
        else:
            problems.append(f"not a pinned entry or its hash: {line.strip()!r}")
    return entries, header, problems


def lock_problems(pyproject: dict, lock_text: str, uv: str) -> list[str]:
    entries, header, problems = read_lock(lock_text)
    wanted = requirements(pyproject)
    problems += [f"{name}=={version} has no --hash" for name, (version, hashes) in entries.items() if not hashes]

    # The header records what the lock was made from: pyproject changed since means `make lock`.
    for section, reqs in wanted.items():
        now, then = set(reqs), set(header.get(section, []))
        if now != then:
            problems.append(f"pyproject.toml's {section} changed since the lock was made: "
                            f"now {sorted(now - then)}, then {sorted(then - now)}")
    if header.get("tooling") != [uv]:
        problems.append(f"tools/lock.py pins {uv}, the lock was made with {header.get('tooling')}")

    # Every pin at its version; `make setup` takes torch by its pin, outside the lock.
    for section in ("dependencies", *EXTRAS):
        for text in wanted[section]:
            req = Requirement(text)
            name = canonical(req.name)
            pins = [s.version for s in req.specifier if s.operator == "=="]
            if len(req.specifier) != 1 or not pins:
                problems.append(f"{text} ({section}) is not pinned with ==")
            elif name == "torch":
                continue
            elif name not in entries:
                problems.append(f"{text} ({section}) is not in the lock")
            elif entries[name][0] != pins[0]:
                problems.append(f"{text} ({section}): the lock has {name}=={entries[name][0]}")
    for text in wanted["build-system"] + [uv]:  # `make setup` installs the project with --no-build-isolation
        req = Requirement(text)
        version = entries.get(canonical(req.name), (None,))[0]
        if version is None:
            problems.append(f"{text} is needed to install, the lock lacks {req.name}")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{text} is needed to install, the lock has {req.name}=={version}")

    if "torch" in entries:
        problems.append("torch is in the lock: its file depends on the machine (README: Dependencies)")
    elif not re.search(r"^# The following packages were excluded from the output:\n# torch$", lock_text, re.M):
        problems.append("torch is not recorded as excluded: was it resolved at all?")
    problems += [f"{name} is in the lock: torch was resolved as its CUDA build, not the CPU wheel"
                 for name in entries if CUDA.match(name)]
    return problems


def test_the_lock_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    problems = lock_problems(pyproject, (ROOT / "requirements.lock").read_text(), tooling_pin())
    if problems:
        pytest.fail("requirements.lock disagrees with pyproject.toml (refresh it: make lock):\n"
                    + "".join(f"  - {p}\n" for p in problems), pytrace=False)


def pyproject_edit(section: str, index: int | None, new):
    """A break: pyproject's requirement `index` of `section` (None: a new one) becomes new(old)."""
    def breaks(pyproject: dict, lock: str) -> str:
        reqs = requirements(pyproject)[section]  # the lists inside `pyproject`
        if index is None:
            reqs.append(new(None))
        else:
            reqs[index] = new(Requirement(reqs[index]))
        return lock
    return breaks


def lock_edit(pattern: str, repl) -> callable:
    """A break: the first line of the lock that `pattern` matches, replaced (it must match one)."""
    def breaks(pyproject: dict, lock: str) -> str:
        new, n = re.subn(pattern(pyproject) if callable(pattern) else pattern, repl, lock, count=1, flags=re.M)
        assert n == 1, pattern
        return new
    return breaks


def first_pin(pyproject: dict) -> str:
    """The lock line of pyproject's first pinned dependency but torch, up to its version."""
    req = next(r for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name != "torch")
    return rf"^({re.escape(req.name)})==\S+"


SHA = "    --hash=sha256:" + "0" * 64
# A copy of pyproject.toml (its dict) or of the lock, broken, and what the check must report.
BREAKS = {
    "a pin changed in pyproject": (pyproject_edit("dev", 0, lambda r: f"{r.name}==0.0.1"), "==0.0.1 (dev): the lock has"),
    "a dependency added": (pyproject_edit("dependencies", None, lambda r: "left-pad==1.0"), "left-pad==1.0 (dependencies) is not in the lock"),
    "an extra asked for": (pyproject_edit("dev", 1, lambda r: f"{r.name}[more]{r.specifier}"), "pyproject.toml's dev changed since the lock was made"),
    "a range, not a pin": (pyproject_edit("team", 0, lambda r: f"{r.name}>=1"), ">=1 (team) is not pinned with =="),
    "the build backend changed": (pyproject_edit("build-system", 0, lambda r: "setuptools>=999"), "setuptools>=999 is needed"),
    "a pin edited in the lock": (lock_edit(first_pin, r"\1==0.0.1"), "(dependencies): the lock has"),
    "an entry without hashes": (lock_edit(r"^uv==(\S+) \\\n(?:    --hash=\S+(?: \\)?\n)+", r"uv==\1\n"), "has no --hash"),
    "an unpinned line": (lock_edit(r"^uv==", "uv>="), "not a pinned entry"),
    "torch locked": (lock_edit(r"^(?=uv==)", f"torch==2.13.0 \\\n{SHA}\n"), "torch is in the lock"),
    "CUDA packages": (lock_edit(r"^(?=uv==)", f"nvidia-cublas==13.1 \\\n{SHA}\n"), "nvidia-cublas is in the lock"),
    "uv at another version": (lock_edit(r"^uv==\S+", "uv==0.0.1"), "is needed to install, the lock has uv==0.0.1"),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_a_lock_that_disagrees_is_caught(case):
    breaks, says = BREAKS[case]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lock_text = breaks(pyproject, (ROOT / "requirements.lock").read_text())
    problems = lock_problems(pyproject, lock_text, tooling_pin())
    assert any(says in p for p in problems), problems


def test_make_setup_reads_the_torch_pin():
    """The Makefile installs torch by `grep -o '"torch==[^"]*' pyproject.toml`: one match, the pin."""
    text = (ROOT / "pyproject.toml").read_text()
    [torch] = [r for r in tomllib.loads(text)["project"]["dependencies"] if canonical(Requirement(r).name) == "torch"]
    assert re.findall(r'"(torch==[^"]*)', text) == [torch]
    assert """grep -o '"torch==[^"]*' pyproject.toml""" in (ROOT / "Makefile").read_text()


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info[:2] == (3, 11)),
                    reason="the lock is resolved for CPython 3.11 on Linux x86_64")
def test_the_lock_holds_every_dependency_of_what_it_installs():
    """Walk the requirements from pyproject.toml down, extras included (pip check, which `make setup`
    runs, skips the extras), in this venv's metadata: each must be in the lock at a version it allows."""
    entries, _, _ = read_lock((ROOT / "requirements.lock").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    todo = [(Requirement(r), "pyproject.toml") for reqs in requirements(pyproject).values() for r in reqs]
    seen, problems = set(), []
    while todo:
        req, by = todo.pop()
        name = canonical(req.name)
        if name == "torch":  # its dependencies count: they are in the lock, torch itself is not
            version = metadata.version("torch")
        elif name not in entries:
            problems.append(f"{req} (needed by {by}) is not in the lock")
            continue
        else:
            version = entries[name][0]
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{by} needs {req}, the lock has {name}=={version}")
        for extra in {""} | req.extras:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                installed = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                installed = None
            if installed is None or installed.version != version:
                problems.append(f"this venv has {name} {installed and installed.version}, the lock {version}: make setup")
                continue
            for text in installed.requires or []:
                dep = Requirement(text)
                if dep.marker is None or dep.marker.evaluate({"extra": extra}):
                    todo.append((dep, f"{name}[{extra}]" if extra else name))
    assert len(seen) > 150, f"only {len(seen)} distributions walked"
    if problems:
        pytest.fail("requirements.lock lacks what pyproject.toml's requirements need (make lock):\n"
                    + "".join(f"  - {p}\n" for p in problems), pytrace=False)
