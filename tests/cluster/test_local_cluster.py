"""`rnnlab tune --local 2` for real: its scheduler takes no one without the run's own certificate,
and a search whose every trial fails stops after --max-failures with one line naming the failure.

One run does both: while its trials fail, an outsider (a fresh Python without the certificate,
then one with a certificate of another CA) tries the scheduler it printed, and `Client.run` of a
function that would leave a file never runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.repos import copy_repo

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

OUTSIDER = """
import sys, pathlib
from distributed import Client, Security
address, mark, how = sys.argv[1:]
security = Security.temporary() if how == "other-ca" else None
try:
    with Client(address, timeout=10, security=security) as client:
        client.run(lambda: pathlib.Path(mark).write_text("ran"))
    print("got in")
except Exception as err:
    print("refused:", type(err).__name__)
"""


def tiny(params: dict) -> None:
    params["data"]["max_tokens"] = 3000
    params["train"].update(epochs=1, hidden_size=8, num_steps=8, batch_size=8, threads=1)
    params["variants"] = {"rnn": {"cell": "rnn"}}


def test_a_local_tune_whose_trials_fail_stops_and_lets_no_outsider_in(tmp_path):
    repo = copy_repo(tmp_path / "repo", tiny)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"}
    env.pop("DVC_EXP_NAME", None)
    proc = subprocess.Popen([sys.executable, "-m", "rnnlab.cli.main", "tune", "--local", "2",
                             "--trials", "3", "--max-failures", "2", "--pruner", "none",
                             "-P", "train.num_steps=int(100000,200000)"],
                            cwd=repo, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"scheduler (\S+) \(TLS", line)
        if found:
            address = found.group(1)
            break
    else:
        raise AssertionError("".join(lines) + proc.stderr.read())
    assert address.startswith("tls://127.0.0.1:")
    mark = tmp_path / "outsider-ran"
    tries = {}
    for how in ("no-certificate", "other-ca"):
        tries[how] = subprocess.run([sys.executable, "-c", OUTSIDER, address, str(mark), how],
                                    env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
                                    capture_output=True, text=True, timeout=120)
    plain = subprocess.run([sys.executable, "-c", OUTSIDER, address.replace("tls://", "tcp://"),
                            str(mark), "plain"], env={"PATH": os.environ["PATH"]},
                           capture_output=True, text=True, timeout=120)
    out, err = proc.communicate(timeout=900)
    lines.append(out)
    for how, result in {**tries, "plain": plain}.items():
        assert result.stdout.startswith("refused:"), (how, result.stdout, result.stderr[-2000:])
    assert not mark.exists()

    assert proc.returncode == 2, "".join(lines) + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.match(r"error: tune: stopped after 2 failed trial\(s\) \(--max-failures 2\); 2 of them: "
                    r"cannot run it: .*num_steps", errors[0]), errors
    assert len(re.findall(r"^tune: trial \d+ \(tune-\d+\)", "".join(lines), re.M)) == 2, "".join(lines)
