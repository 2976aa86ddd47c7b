"""train.threads: auto counts this repository's queue workers and our running stages (rnnlab/training/threads.py)."""

from pathlib import Path

from rnnlab.training.threads import auto_threads, queue_workers, running_stages
from stages import TORCH_STAGES

ROOT = Path("/work/repo")
PROCESSES = [
    {"cmdline": ["/v/bin/python", "/v/bin/dvc", "exp", "queue-worker", "dvc-exp-1@localhost"],
     "cwd": "/work/repo/.dvc/tmp/exps/celery"},
    {"cmdline": ["/v/bin/python", "/v/bin/dvc", "exp", "queue-worker", "dvc-exp-2@localhost"],
     "cwd": "/work/repo/.dvc/tmp/exps/celery"},
    {"cmdline": ["/v/bin/python", "/v/bin/dvc", "exp", "queue-worker", "dvc-exp-1@localhost"],
     "cwd": "/elsewhere/.dvc/tmp/exps/celery"},                       # another repository's
    {"cmdline": ["/v/bin/python", "-m", "stages.train", "--variant", "rnn"], "cwd": "/tmp/exp1"},
    {"cmdline": ["/bin/sh", "-c", "python -m stages.train --variant rnn"], "cwd": "/tmp/exp1"},  # its shell
    {"cmdline": ["/v/bin/python", "-m", "stages.evaluate", "--variant", "gru"], "cwd": "/tmp/exp2"},
    {"cmdline": ["/v/bin/python", "-m", "stages.report"], "cwd": "/tmp/exp3"},  # no torch threads
]


def test_counts_this_repositorys_workers_and_our_stage_processes_only():
    assert queue_workers(ROOT, PROCESSES) == 2
    assert running_stages(PROCESSES, TORCH_STAGES) == 2


def test_each_of_the_parallel_trainings_gets_its_share(monkeypatch):
    import rnnlab.training.threads as threads

    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    monkeypatch.setattr(threads, "_processes", lambda: PROCESSES)
    assert auto_threads(ROOT, TORCH_STAGES) == (4, "auto: 8 CPUs shared by 2 parallel DVC queue workers")
    monkeypatch.setattr(threads, "_processes", lambda: PROCESSES[3:] * 3)  # 6 stages, no queue
    assert auto_threads(ROOT, TORCH_STAGES) == (1, "auto: 8 CPUs shared by 6 parallel stages")
    monkeypatch.setattr(threads, "_processes", lambda: [])
    assert auto_threads(ROOT, TORCH_STAGES) == (8, "auto: all 8 CPUs, nothing else running")
