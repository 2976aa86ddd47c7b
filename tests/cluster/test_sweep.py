"""The parts of rnnlab/cluster that need no cluster: the grid and the space, the checks before a
sweep, a worker's settings and error lines, progress, and the guard that kills a dead worker's
commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rnnlab.cluster import grid, space, sweep, worker
from rnnlab.cluster.job import Job
from rnnlab.errors import UserError
from tests.repos import git

ROOT = Path(__file__).resolve().parents[2]
JOB = Job(name="s-1", settings=("train.lr=0.1",), base="a" * 40, git_url="/origin", dvc_remote=None,
          tracking_uri=None, sweep="ab12cd34", cpus=3)


def test_the_grid_is_dvcs_own_product_in_dvcs_order():
    combos = grid.expand(["train.lr=0.001,0.002", "train.epochs=range(1,3)"])
    assert combos == [("train.lr=0.001", "train.epochs=1"), ("train.lr=0.001", "train.epochs=2"),
                      ("train.lr=0.002", "train.epochs=1"), ("train.lr=0.002", "train.epochs=2")]
    assert grid.expand(["train.optimizer=choice(sgd,adam)"]) == [("train.optimizer=sgd",),
                                                                 ("train.optimizer=adam",)]


def test_a_grid_that_is_not_dvcs_syntax_is_one_line():
    with pytest.raises(UserError, match=r"-S train.lr=0.001,: not DVC's -S syntax") as err:
        grid.expand(["train.lr=0.001,"])
    assert len(str(err.value).splitlines()) == 1


def test_every_bad_setting_is_named_before_anything_runs():
    with pytest.raises(UserError) as err:
        grid.check(ROOT, grid.expand(["train.lr=-1,0.1", "train.epochs=2"]))
    assert str(err.value) == "-S train.lr=-1 train.epochs=2: train.lr = -1: Input should be greater than 0"
    with pytest.raises(UserError, match=r"-S train.nope=3: train.nope is not a key of params.yaml"):
        grid.check(ROOT, [("train.nope=3",)])


def test_an_experiments_name_is_its_commit_and_settings_in_any_order():
    a = grid.name("sweep", "c" * 40, ("train.lr=0.1", "train.seed=1"))
    assert a == grid.name("sweep", "c" * 40, ("train.seed=1", "train.lr=0.1"))
    assert a != grid.name("sweep", "d" * 40, ("train.lr=0.1", "train.seed=1"))
    assert a != grid.name("sweep", "c" * 40, ("train.lr=0.2", "train.seed=1"))
    assert a.startswith("sweep-") and len(a) == len("sweep-") + 7


def test_a_space_parses_to_optuna_distributions_and_back_to_settings():
    dims = space.parse(["train.lr=loguniform(1e-4,1e-1)", "train.dropout=uniform(0,0.5)",
                        "variants.lstm.num_layers=int(1,3)", "train.optimizer=choice(sgd,adam)"])
    assert dims["train.lr"].log and (dims["train.lr"].low, dims["train.lr"].high) == (1e-4, 0.1)
    assert not dims["train.dropout"].log
    assert (dims["variants.lstm.num_layers"].low, dims["variants.lstm.num_layers"].high) == (1, 3)
    assert dims["train.optimizer"].choices == ("sgd", "adam")
    assert space.extremes({"train.lr": dims["train.lr"]}) == [("train.lr=0.0001",), ("train.lr=0.1",)]
    assert space.settings({"train.lr": 0.01, "train.bf16": True}) == ("train.lr=0.01", "train.bf16=true")


@pytest.mark.parametrize("spec, message", [
    ("train.lr=normal(0,1)", "expected KEY=KIND(ARGS)"),
    ("train.lr=uniform(1)", "give two bounds"),
    ("variants.x.num_layers=int(1,2.5)", "int bounds are integers"),
    ("train.lr=uniform(1,0)", "-P train.lr=uniform(1,0)"),
])
def test_a_bad_dimension_is_one_line_naming_it(spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        space.parse([spec])


def test_a_worker_gives_the_experiment_its_cores_and_gpu():
    assert worker.settings(JOB) == ["train.lr=0.1", "train.threads=3"]
    gpu = Job(**{**JOB.__dict__, "gpus": 1})
    assert worker.settings(gpu)[-1] == "train.device=cuda"


@pytest.mark.parametrize("output, line", [
    ("Running stage 'train@rnn':\nerror: the MLflow server at http://a:***@h refused x\nERROR: failed",
     "the MLflow server at http://a:***@h refused x"),
    ("ERROR: failed to push: https://ann:s3cret@h/x.git not found", "failed to push: https://ann:***@h/x.git not found"),
    ("fatal: repository '/nope' does not exist\n", "repository '/nope' does not exist"),
    ("", "no output"),
])
def test_a_workers_failure_is_the_line_that_says_why_with_secrets_masked(output, line):
    assert worker.error_line(output) == line


def test_progress_says_what_is_done_running_where_and_failed(capsys):
    p = sweep.Progress(total=3)
    p.event((0.0, {"name": "s-2", "step": "run", "where": "node1 tcp://10.0.0.1:4000"}))
    p.event((0.0, {"name": "s-1", "step": "clone", "where": "node2 tcp://10.0.0.2:4000"}))
    p.say()
    p.say()  # unchanged: not printed again
    p.ended("s-1")
    p.failed.append("s-1: boom")
    p.say()
    assert capsys.readouterr().out.splitlines() == [
        "sweep: 0/3 done, 2 running (s-1 clone on node2 tcp://10.0.0.2:4000; s-2 run on node1 "
        "tcp://10.0.0.1:4000), 0 failed",
        "sweep: 0/3 done, 1 running (s-2 run on node1 tcp://10.0.0.1:4000), 1 failed"]


def test_a_sweep_refuses_uncommitted_changes_and_a_remote_with_a_login(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "params.yaml").write_text("a: 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    sweep.require_clean(repo)
    (repo / "params.yaml").write_text("a: 2\n")
    with pytest.raises(UserError, match=r"uncommitted changes \(params.yaml\): a sweep runs the committed code"):
        sweep.require_clean(repo)
    git(repo, "remote", "add", "origin", "https://ann:s3cret@git.example.org/lab.git")
    with pytest.raises(UserError) as err:
        sweep.git_remote(repo, None, local=False)
    assert "carries a login" in str(err.value) and "s3cret" not in str(err.value)
    with pytest.raises(UserError, match="--remote nope: no such git remote"):
        sweep.git_remote(repo, "nope", local=False)


def test_with_local_the_repository_is_its_own_remote(tmp_path):
    git(tmp_path, "init", "-q")
    assert sweep.git_remote(tmp_path, None, local=True) == str(tmp_path)
    git(tmp_path, "remote", "add", "origin", "/srv/git/lab.git")
    assert sweep.git_remote(tmp_path, None, local=True) == str(tmp_path)
    assert sweep.git_remote(tmp_path, "origin", local=True) == "/srv/git/lab.git"
    assert sweep.git_remote(tmp_path, None, local=False) == "/srv/git/lab.git"  # the only one
    git(tmp_path, "remote", "add", "backup", "/srv/git/backup.git")
    with pytest.raises(UserError, match="no git remote to run the sweep from"):
        sweep.git_remote(tmp_path, None, local=False)


def test_the_guard_takes_a_dead_workers_commands_with_it(tmp_path):
    """A 'worker' starts a guarded command that starts a grandchild, then dies by SIGKILL: the
    kernel signals the guard, which ends its whole group. Nothing runs between fork and exec:
    the guard asks for the signal itself."""
    pids = tmp_path / "pids"
    script = (
        "import subprocess, sys, time\n"
        "from rnnlab.cluster import guard\n"
        f"p = subprocess.Popen(guard.command({str(tmp_path)!r}, 'sh', '-c',"
        f" 'sleep 300 & echo $$ $! > {pids}; wait'), start_new_session=True)\n"
        "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 20
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    shell, sleeper = map(int, pids.read_text().split())
    assert alive(shell) and alive(sleeper)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while alive(shell) or alive(sleeper):
        assert time.monotonic() < deadline, "the guarded commands outlived their worker"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")  # a zombie is dead


def test_a_scheduler_that_does_not_answer_is_one_line(monkeypatch):
    import argparse

    from deploy.settings import free_port
    from rnnlab.cli import sweep as cli
    from rnnlab.cli.sweep import cluster

    monkeypatch.setattr(cli, "CONNECT_SECONDS", 1)
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as err:
        with cluster(argparse.Namespace(scheduler=address, local=None), cpus=1):
            pass
    assert str(err.value).startswith(f"cannot reach the Dask scheduler at {address} (")
    assert len(str(err.value).splitlines()) == 1
