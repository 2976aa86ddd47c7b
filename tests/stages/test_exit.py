"""`run_program`: a stage run as a program leaves without the interpreter's teardown, with
run_main's exit status, its output flushed and every exit handler registered after it run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.stagerun import ROOT, stage_env

PROGRAM = """
import atexit, logging, sys
from rnnlab.errors import UserError, run_program

def main():
    logging.basicConfig(filename=sys.argv[2], level=logging.INFO)
    atexit.register(lambda: print("handler ran", file=sys.stderr))  # as MLflow's are
    print("x" * 100_000, end="")  # buffered: a pipe is no terminal
    logging.info("logged")
    how = sys.argv[1]
    if how == "user":
        raise UserError("bad value\\nanother")
    if how == "bug":
        raise RuntimeError("boom")
    if how == "exit":
        raise SystemExit(3)

run_program(main)
"""


@pytest.mark.parametrize("how, status, tail", [
    ("ok", 0, ""),
    ("user", 2, "error: bad value\nerror: another\n"),
    ("bug", 1, "RuntimeError: boom\n"),
    ("exit", 3, ""),
])
def test_a_program_keeps_its_status_output_and_exit_handlers(tmp_path, how, status, tail):
    log = tmp_path / "log.txt"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PROGRAM), how, str(log)],
                          cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "x" * 100_000
    assert log.read_text() == "INFO:root:logged\n"
    assert proc.stderr.endswith(tail + "handler ran\n"), proc.stderr
