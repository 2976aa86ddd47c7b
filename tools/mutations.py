"""Break, on purpose, what the test suite must guard, and show that it fails (issue 21).

    python tools/mutations.py               # every mutation below, one at a time
    python tools/mutations.py eos 401       # some of them

Each mutation replaces one piece of the code in a throwaway copy of the working tree (git's
tracked and untracked files), runs the tests that stand guard over it (`pytest -x`, with the
project's venv), and reports the first test that failed, or that none did. The working tree is
never touched. Exit status 1 if any mutation survived.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: sys.path holds tools/, not the repository
    sys.path.insert(0, str(ROOT))

from tools.tinyrepo import tree_copy  # noqa: E402


@dataclass(frozen=True)
class Mutation:
    what: str          # in words
    file: str          # relative to the repository
    old: str           # the code as it is (must occur exactly once)
    new: str           # the code broken
    tests: tuple[str, ...]  # what pytest runs


MUTATIONS = {
    "store-lock": Mutation(
        "the lock around the SQLite store: none",
        "rnnlab/tracking/store.py",
        '    if not uri.startswith("sqlite:///"):\n        return nullcontext()\n    return _StoreLock(',
        '    if True:\n        return nullcontext()\n    return _StoreLock(',
        ("tests/tracking/test_tracking.py", "tests/stages/test_queue.py")),
    "resume-code": Mutation(
        "the resume fingerprint's code hash: left out",
        "rnnlab/training/resume.py",
        "code={**codedeps.digest(stage, code_root), **compiled_digest(code_root)},",
        "code={},",
        ("tests/training/test_resume.py", "tests/stages/test_reliability.py")),
    "resume-cpp": Mutation(
        "the resume fingerprint: the compiled loops' C++ left out",
        "rnnlab/training/resume.py",
        "code={**codedeps.digest(stage, code_root), **compiled_digest(code_root)},",
        "code={**codedeps.digest(stage, code_root)},",
        ("tests/training/test_resume.py",)),
    "secret-source": Mutation(
        "a data.source with a login or a signature: accepted",
        "rnnlab/config.py",
        "        found = credentials_in(v)\n",
        "        found = []\n",
        ("tests/test_redact.py", "tests/data/test_download.py")),
    "mask-query": Mutation(
        "a shown URI: its signature left in",
        "rnnlab/redact.py",
        "    netloc, query = parts.netloc, _masked_query(parts.query)",
        "    netloc, query = parts.netloc, parts.query",
        ("tests/test_redact.py",)),
    "native-target": Mutation(
        "the compiled library's name: the target ISA and compiler left out",
        "rnnlab/kernels/native.py",
        'cache_dir() / "native" / f"{PREFIX}{target_digest()}-{build_key()}.so"',
        'cache_dir() / "native" / f"{PREFIX}{build_key()}.so"',
        ("tests/kernels/test_native.py",)),
    "evaluation-run": Mutation(
        "an evaluation may rewrite another experiment's run",
        "rnnlab/tracking/runs.py",
        '    if tags.get("rnnlab.dvc_exp") != os.environ.get("DVC_EXP_NAME"):\n        return False\n',
        "",
        ("tests/tracking/test_tracking.py", "tests/stages/test_queue.py")),
    "eos": Mutation(
        "<eos> at line ends: none",
        "rnnlab/data/text.py",
        '"eos": f" {EOS} "}',
        '"eos": " "}',
        ("tests/data/test_tokenize.py",)),
    "401": Mutation(
        "the 401 error line: the login's fix left out",
        "rnnlab/tracking/store.py",
        '"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your login "',
        '"your login "',
        ("tests/deploy/test_team_access.py",)),
    "nan": Mutation(
        "the compiled loop's NaN pass-through: a NaN argument clamped",
        "rnnlab/kernels/csrc/recurrence.cpp",
        "x = x > 88.3762626647949f ? 88.3762626647949f : x;",
        "x = x < 88.3762626647949f ? x : 88.3762626647949f;",
        ("tests/kernels/test_native.py", "tests/models/test_models.py")),
    "kernel-key": Mutation(
        "the kernel cache key: the machine, code and library left out",
        "rnnlab/kernels/choice.py",
        '    full = f"{here()} | {kind} {key} | {\'/\'.join(names)}"',
        '    full = f"{kind} {key} | {\'/\'.join(names)}"',
        ("tests/kernels/test_choice.py",)),
}


def run(name: str, m: Mutation) -> str | None:
    """The first failing test's id, or None if the mutant passed."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        tree = tree_copy(Path(tmp) / "tree")
        path = tree / m.file
        text = path.read_text()
        if text.count(m.old) != 1:
            raise SystemExit(f"{name}: {m.file} no longer holds the code to break exactly once")
        path.write_text(text.replace(m.old, m.new))
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
               "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(tree)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               "-n", "0", *m.tests], cwd=tree, env=env, capture_output=True, text=True)
        failed = re.findall(r"^FAILED (.+?)(?: - .*)?$", proc.stdout, re.M)
        if proc.returncode == 0:
            return None
        return failed[0] if failed else f"pytest exited {proc.returncode}:\n{proc.stdout[-2000:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", choices=[[], *MUTATIONS], metavar="NAME",
                        help=f"mutations to run (default: all): {', '.join(MUTATIONS)}")
    args = parser.parse_args()
    survived = 0
    for name in args.names or MUTATIONS:
        m = MUTATIONS[name]
        print(f"{name:15} {m.what}: ", end="", flush=True)
        caught = run(name, m)
        survived += caught is None
        print(f"caught by {caught}" if caught else "SURVIVED: no test failed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
