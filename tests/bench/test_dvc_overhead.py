"""bench/dvc_overhead.py: the arithmetic of the shares and the reading of a process tree, on fake
psutil processes and on a real parent that waits for a child burning CPU (as dvc waits for a
stage); end to end on a tiny pipeline (slow)."""

import subprocess
import sys
from types import SimpleNamespace

import psutil
import pytest

from bench.dvc_overhead import Sample, dvc_parent_share, sample, shares, watch


class FakeProc:
    """As much of psutil.Process as `sample` reads."""

    def __init__(self, pid, ppid, cmdline, cpu, threads=(), children=(), gone=False):
        self.pid, self._ppid, self._cmdline, self._cpu = pid, ppid, cmdline, cpu
        self._threads, self._children, self._gone = threads, children, gone

    def _check(self):
        if self._gone:
            raise psutil.NoSuchProcess(self.pid)

    def cpu_times(self):
        self._check()
        return SimpleNamespace(user=self._cpu * 0.75, system=self._cpu * 0.25)

    def threads(self):
        return [SimpleNamespace(id=tid, user_time=c, system_time=0.0) for tid, c in self._threads]

    def children(self, recursive=False):
        assert recursive
        return list(self._children)

    def ppid(self):
        self._check()
        return self._ppid

    def cmdline(self):
        self._check()
        return self._cmdline


def test_sample_splits_the_tree_into_parent_stage_and_helpers():
    stage = FakeProc(2, 1, ["python", "-m", "stages.train", "--variant", "rnn"], 3.0)
    compiler = FakeProc(3, 2, ["cc", "-O2", "kernel.c"], 0.5)  # the stage's own child
    helper = FakeProc(4, 1, ["git", "status"], 0.25)
    exited = FakeProc(5, 1, ["git", "add"], 1.0, gone=True)
    dvc = FakeProc(1, 0, ["dvc", "repro"], 1.5, threads=[(1, 1.25), (7, 0.25)],
                   children=[stage, compiler, helper, exited])
    s = sample(dvc)
    assert s.parent == pytest.approx(1.5)
    assert s.stage == pytest.approx(3.5)
    assert s.helpers == pytest.approx({4: 0.25})
    assert s.threads == pytest.approx({1: 1.25, 7: 0.25})
    assert sample(FakeProc(1, 0, ["dvc"], 1.0, gone=True)) is None
    idle = sample(FakeProc(1, 0, ["dvc"], 1.0, children=[helper]))
    assert idle.stage is None and idle.helpers == pytest.approx({4: 0.25})


def test_shares_count_only_the_window_in_which_the_stage_ran():
    samples = [
        Sample(0.0, parent=0.0, stage=None),  # dvc starting: not in the window
        Sample(2.0, parent=1.5, stage=None, threads={1: 1.5}),
        Sample(3.0, parent=1.6, stage=0.1, helpers={9: 0.2}, threads={1: 1.6, 2: 0.0}),
        Sample(5.0, parent=1.7, stage=2.1, helpers={9: 0.3, 10: 0.1}, threads={1: 1.6, 2: 0.1}),
        Sample(7.0, parent=2.0, stage=6.1, helpers={9: 0.3}, threads={1: 1.7, 2: 0.3}),
        Sample(8.0, parent=3.0, stage=None, threads={1: 2.8, 2: 0.2}),  # saving the outputs
    ]
    r = shares(samples, cores=2)
    assert r["wall_seconds"] == pytest.approx(4.0)
    assert r["dvc_parent_cpu_seconds"] == pytest.approx(0.4)
    assert r["dvc_parent_share_of_a_core"] == pytest.approx(0.1)
    assert r["stage_cpu_seconds"] == pytest.approx(6.0)
    assert r["stage_share_of_cores"] == pytest.approx(1.5)
    assert r["helpers_cpu_seconds"] == pytest.approx(0.1 + 0.1)  # 9: 0.2 -> 0.3; 10: all of it
    assert r["helper_processes"] == 2
    assert r["dvc_parent_and_helpers_share_of_a_core"] == pytest.approx(0.6 / 4)
    assert r["dvc_parent_cpu_seconds_before_stage"] == pytest.approx(1.6)
    assert r["dvc_parent_cpu_seconds_after_stage"] == pytest.approx(1.0)
    assert r["dvc_seconds_before_stage"] == pytest.approx(3.0)
    assert r["dvc_seconds_after_stage"] == pytest.approx(1.0)
    assert [t["thread"] for t in r["dvc_parent_threads"]] == [2, 1]  # 0.3 s, then 0.1 s
    assert r["dvc_parent_threads"][0]["cpu_seconds"] == pytest.approx(0.3)


def test_shares_need_the_stage_in_two_samples():
    with pytest.raises(ValueError, match="too short"):
        shares([Sample(0.0, 0.0, None), Sample(1.0, 0.1, 0.5), Sample(2.0, 0.2, None)])


BURN = ("import time\nt = time.process_time()\n"
        "while time.process_time() - t < 0.5:\n    pass\n")


def test_a_waiting_parent_costs_nothing_while_its_child_burns_cpu():
    """The parent waits as dvc does (subprocess.run: Popen.wait, a blocking waitpid)."""
    parent_code = ("import subprocess, sys\n"
                   f"subprocess.run([sys.executable, '-c', {BURN!r}, 'burner'], check=True)\n")
    popen = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        samples = watch(psutil.Process(popen.pid), 0.02,
                        is_stage=lambda cmdline: "burner" in cmdline)
    finally:
        popen.wait(timeout=30)
    r = shares(samples)  # the window: from the first sample that saw the child to the last
    # what the window saw of the child, never more than the 0.5 s of CPU it burns (how much of
    # its start the sampling missed depends on the machine's load: no lower bound but "some")
    assert 0 < r["stage_cpu_seconds"] <= 0.5 + 0.1
    # the parent sits in waitpid meanwhile: CPU seconds, not wall time, so load cannot inflate it
    assert r["dvc_parent_cpu_seconds"] < 0.05
    assert r["helper_processes"] == 0


@pytest.mark.slow  # clones the repository and runs two stages through dvc: ~20 s
def test_dvc_parent_share_end_to_end(tmp_path):
    r = dvc_parent_share(tmp_path, epochs=1, hidden_size=8, threads=1)
    assert r["ran_the_stage"]
    assert r["wall_seconds"] > 0 and r["samples"] >= 2
    assert r["stage_cpu_seconds"] > 0
    assert 0 < r["stage_share_of_cores"] <= r["cores"] * 1.1  # 1.1: the edges of the window
    assert 0 <= r["dvc_parent_share_of_a_core"] < r["cores"]
    # dvc waits in waitpid while the stage runs (see the module's docstring)
    assert r["dvc_parent_share_of_a_core"] < 0.1
    assert r["dvc_parent_cpu_seconds_whole_run"] > r["dvc_parent_cpu_seconds"]
