"""Sweeps as people run them: the real `dvc queue` with parallel workers, and cached stages.

Each test works on its own copy of the session's tiny pipeline (tests/repos.py) and lets the
stages find the default store themselves (`<repository>/mlflow.db`, through DVC_ROOT, also from
the queue's temporary workspaces). The record is then read back and held against DVC's:
- every queued experiment succeeds, with 4 workers (twice the CPUs of a 2-core machine) on a new
  store, which their stages create and write at once;
- each (experiment, variant) has exactly one FINISHED MLflow run, whose params and metrics equal
  what `dvc exp show` lists for that experiment, and whose per-epoch series have every epoch once;
- `train.threads: auto` gives each worker its share of the CPUs;
- an experiment whose training DVC restores (the run-cache scenario of docs/tracking.md) gets its
  own run, linked to the training run, and the other experiment's run is left untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rnnlab.tracking.records import mlflow_name
from rnnlab.training.threads import usable_cpus
from tests.repos import TINY_VARIANTS, edit_params

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
VARIANTS = {"lstm": TINY_VARIANTS["lstm"]}  # the sweep's: one per experiment is the race
EPOCHS = 2
SWEEP = ["0.001", "0.002", "0.005", "0.01"]
JOBS = 4


def dvc(*args: str, cwd: Path, timeout: float = 1200) -> str:
    """A dvc command as a user types it: no tracking URI set, so the default store is used."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="true", DVC_NO_ANALYTICS="1")
    # output to a file, not a pipe: `dvc queue start` leaves daemon workers behind, and a pipe
    # they inherit would keep subprocess.run waiting until they exit
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, stdout=out, stderr=err,
                              stdin=subprocess.DEVNULL, text=True, timeout=timeout)
        stdout, stderr = (f.seek(0) or f.read() for f in (out, err))
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{stdout}\n{stderr}"
    return stdout + stderr


def wait_for_queue(repo: Path, timeout: float = 1200) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return the last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = dvc("queue", "status", cwd=repo)
        rows = [line.split() for line in status.splitlines()[1:] if line.strip() and not line.startswith("Worker")]
        if rows and not any(r[-1] in ("Queued", "Running") for r in rows):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout} s:\n{status}"
        time.sleep(1)


def dvc_experiments(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> its params.yaml and its per-variant metrics."""
    found = {}
    for baseline in json.loads(dvc("exp", "show", "--json", cwd=repo)):
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            data = rev["data"]
            metrics = {Path(path).stem: m["data"] for path, m in data["metrics"].items()
                       if path.startswith("metrics/variants/")}
            found[rev["name"]] = {"params": data["params"]["params.yaml"]["data"], "metrics": metrics}
    return found


def mlflow_runs(repo: Path) -> tuple:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("timemachine-char")
    assert exp is not None, "no MLflow experiment in the default store"
    return client, client.search_runs([exp.experiment_id])


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def assert_run_equals_dvc(run, exp: dict, variant: str) -> None:
    """The run's params and metrics are the experiment's, to the digit."""
    params = flat({k: v for k, v in exp["params"].items() if k in ("data", "tokenize", "train", "evaluate")})
    logged = run.data.params
    for key, value in params.items():
        assert logged[key] == ("null" if value is None else str(value)), (variant, key)
    assert logged["variant"] == variant and logged["model.cell"] == TINY_VARIANTS[variant]["cell"]
    for key, value in exp["metrics"][variant].items():
        assert run.data.metrics[mlflow_name(key)] == value, (variant, key)


def test_a_queued_sweep_records_each_experiment_once(pipeline, tmp_path):
    jobs = JOBS
    repo = pipeline.copy(tmp_path / "repo")
    def sweep_params(params):
        params["train"]["threads"] = "auto"
        params["variants"] = dict(VARIANTS)

    edit_params(repo, sweep_params, "the sweep's params: threads auto, one variant")
    (repo / "mlflow.db").unlink()  # a new store: the workers' stages create it together
    shutil.rmtree(repo / "mlruns")
    dvc("repro", "tokenize", cwd=repo)  # the stages every experiment shares, once (README: Sweeps)
    dvc("exp", "run", "--queue", "-S", f"train.lr={','.join(SWEEP)}", cwd=repo)
    dvc("queue", "start", "-j", str(jobs), cwd=repo)
    try:
        status = wait_for_queue(repo)
    finally:
        subprocess.run([str(BIN / "dvc"), "queue", "stop"], cwd=repo, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)
    print(status)
    assert status.count("Success") == len(SWEEP), status

    exps = dvc_experiments(repo)
    assert sorted(str(e["params"]["train"]["lr"]) for e in exps.values()) == sorted(SWEEP)
    client, runs = mlflow_runs(repo)
    pairs = [(r.data.tags.get("rnnlab.dvc_exp"), r.data.tags["rnnlab.variant"]) for r in runs]
    assert sorted(pairs) == sorted((name, v) for name in exps for v in VARIANTS), pairs  # one each
    for run in runs:
        name, variant = run.data.tags["rnnlab.dvc_exp"], run.data.tags["rnnlab.variant"]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"{variant} [{name}]"
        assert_run_equals_dvc(run, exps[name], variant)
        for series in ("train_ppl", "val_ppl", "tokens_per_sec"):  # no lost, no doubled epoch
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, series))
            assert steps == list(range(1, EPOCHS + 1)), (name, variant, series)
        assert run.data.tags["rnnlab.train_run_id"] == run.info.run_id  # trained and evaluated here
    assert_cpus_shared(runs, jobs)


def assert_cpus_shared(runs: list, jobs: int) -> None:
    """train.threads: auto. No training takes more than its share of the CPUs among the
    experiments running when it starts (a run spans its training and evaluation; a worker runs
    one experiment at a time, so at least that many workers were alive), and while all the
    workers run, each training gets CPUs // workers."""
    cpus = usable_cpus()
    for run in runs:
        start, exp = run.info.start_time, run.data.tags["rnnlab.dvc_exp"]
        others = {r.data.tags["rnnlab.dvc_exp"] for r in runs if r.data.tags["rnnlab.dvc_exp"] != exp
                  and r.info.start_time <= start <= r.info.end_time}
        assert int(run.data.tags["rnnlab.threads"]) <= max(1, cpus // (1 + len(others))), (exp, others)
    assert min(int(r.data.tags["rnnlab.threads"]) for r in runs) == max(1, cpus // jobs)


def test_an_experiment_whose_training_dvc_restores_gets_its_own_run(experiments, tmp_path):
    """docs/tracking.md: after `dvc exp run -n exp-b` (the session's experiments), `-n warm` with
    another evaluate setting, in a temporary copy (`--temp`): DVC restores exp-b's training from
    its run cache and reruns evaluate only. warm's evaluation is recorded in a run of warm's, in
    the repository's default store, linked to exp-b's training run; exp-b's run is not touched."""
    repo = experiments.copy(tmp_path / "repo")
    client, runs = mlflow_runs(repo)
    base = {r.data.tags["rnnlab.variant"]: r for r in runs if r.data.tags.get("rnnlab.dvc_exp") == "exp-b"}
    assert sorted(base) == sorted(TINY_VARIANTS)
    samples = {v: client.download_artifacts(r.info.run_id, f"samples/{v}.md", str(tmp_path / "a" / v))
               for v, r in base.items()}
    samples = {v: Path(p).read_text() for v, p in samples.items()}

    out = dvc("exp", "run", "--temp", "-n", "warm", "-S", "evaluate.temperature=1.7", cwd=repo)
    # restored from the run cache, or found unchanged in the copy: either way not trained again
    assert "Running stage 'train@" not in out, out
    assert re.search(r"Stage 'train@lstm' (is cached|didn't change)", out), out
    assert "Running stage 'evaluate@lstm'" in out

    exps = dvc_experiments(repo)
    client, runs = mlflow_runs(repo)
    by_exp = {}
    for r in runs:
        by_exp.setdefault(r.data.tags.get("rnnlab.dvc_exp"), {})[r.data.tags["rnnlab.variant"]] = r
    assert set(by_exp) == {None, "exp-a", "exp-b", "warm"}  # None: the pipeline's `dvc repro`
    assert sorted(by_exp["warm"]) == sorted(by_exp["exp-b"]) == sorted(TINY_VARIANTS)
    for variant, run in by_exp["warm"].items():
        trained = base[variant]
        assert run.info.run_id != trained.info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["rnnlab.train_run_id"] == trained.info.run_id
        assert run.data.tags["rnnlab.dvc_stage"] == f"evaluate@{variant}"
        assert trained.info.run_id in run.data.tags["mlflow.note.content"]
        assert run.data.params["evaluate.temperature"] == "1.7"
        assert_run_equals_dvc(run, exps["warm"], variant)

    for variant, before in base.items():  # base's record is exactly as it was
        after = client.get_run(before.info.run_id)
        assert (after.data.params, after.data.metrics, after.data.tags) == \
               (before.data.params, before.data.metrics, before.data.tags)
        assert after.data.params["evaluate.temperature"] == "0.8"
        assert_run_equals_dvc(after, exps["exp-b"], variant)
        path = client.download_artifacts(before.info.run_id, f"samples/{variant}.md", str(tmp_path / "b" / variant))
        assert Path(path).read_text() == samples[variant]
