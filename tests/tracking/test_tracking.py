"""MLflow tracking: every run recorded, linked to its DVC experiment, comparable in the UI.

Fast tests drive `rnnlab.tracking` in-process against a SQLite store in tmp_path. The slow ones
run the real stage modules (`python -m stages.train` / `stages.evaluate`) as subprocesses from the
repository root on a 600-token corpus, against a SQLite store or a real `mlflow server` on
127.0.0.1, and read the result back with MlflowClient or the REST API. Nothing is written
outside tmp_path: every subprocess gets DVC_ROOT=tmp_path, so even the default store lands there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from rnnlab.config import Tracking
from rnnlab.tracking.records import (
    CURVE_FIELDS,
    mlflow_name,
    record_curves,
    record_curves_png,
    record_summary,
)
from rnnlab.tracking.runs import experiment_name, stage_run, tracked_run
from rnnlab.tracking.store import artifact_location
from rnnlab.tracking.tracker import Tracker
from tests.conftest import shipped, shipped_params
from tests.repos import TINY_VARIANTS, store_copy
from tests.repos import mlflow_server as server_on
from tests.stagerun import in_process

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
EXPERIMENT = "timemachine-char"
VARIANTS = {"rnn": {"cell": "rnn", "hidden_size": 16}, "gru_scratch": {"cell": "gru", "impl": "scratch"}}
EPOCHS = 2


# ---------------------------------------------------------------------------------------------
# helpers


def tiny_params(path: Path, train: dict | None = None, tracking: dict | None = None) -> Path:
    """A params.yaml for a run of seconds: 600 training tokens, 8 hidden units, 2 epochs."""
    params = shipped_params({
        "data": {"corpus": "timemachine", "max_tokens": 600},
        "tokenize": {"token": "char"},
        "train": {"lr": 0.01, "clip_theta": 1.0, "num_steps": 8, "hidden_size": 8, "batch_size": 4,
                  "epochs": EPOCHS, "optimizer": "adam", "device": "cpu", "threads": 1,
                  **(train or {})},
        "variants": VARIANTS,
        "evaluate": {"prefixes": ["time"], "num_tokens": 5, "num_samples": 1},
        "tracking": {"enabled": True, **(tracking or {})},
    })
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage_env(root: Path, uri: str | None, **extra: str) -> dict:
    """The environment of a stage run: no inherited tracking or DVC settings, telemetry off,
    DVC_ROOT = `root` so a default store could only land there."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_")) or k == "MLFLOW_DISABLE_TELEMETRY"}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", DVC_NO_ANALYTICS="1",
               PYTHONUNBUFFERED="1", DVC_ROOT=str(root), **extra)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def run_stage(module: str, *args, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """The stage as a subprocess: where the process itself is tested (a signal, a server lost)."""
    return subprocess.run([PY, "-m", f"stages.{module}", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(module: str, *args, env: dict) -> subprocess.CompletedProcess:
    """The stage's main() in this process (tests/stagerun.py), as `run_stage` runs it."""
    return in_process(module, *args, cwd=ROOT, env=env)


def train_args(params: Path, variant: str, tokens: Path, out: Path) -> list:
    return ["--params", params, "--variant", variant, "--data", tokens, "--out", out / "models" / variant,
            "--curves", out / "curves" / f"{variant}.csv", "--work", out / "checkpoints" / variant]


def evaluate_args(params: Path, variant: str, tokens: Path, out: Path) -> list:
    return ["--params", params, "--variant", variant, "--data", tokens, "--model", out / "models" / variant,
            "--metrics", out / "metrics" / f"{variant}.json", "--samples", out / "samples" / f"{variant}.md"]


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


def only_experiment_runs(uri: str, filter_string: str = "", experiment: str = EXPERIMENT) -> list:
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} at {uri}"
    return c.search_runs([exp.experiment_id], filter_string)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """The real download and tokenize stages, into a temp folder (no torch, no MLflow: ~1 s)."""
    base = tmp_path_factory.mktemp("tokens")
    params = tiny_params(base / "params.yaml")
    env = stage_env(base, None)
    ok(run_in_process("download", "--params", params, "--out", base / "raw", env=env))
    ok(run_in_process("tokenize", "--params", params, "--raw", base / "raw", "--out", base / "tokens", env=env))
    return base / "tokens"


# ---------------------------------------------------------------------------------------------
# in-process: rnnlab.tracking and rnnlab.records (fast without a store, slow with one)


def test_artifacts_live_beside_a_sqlite_store_and_with_the_server():
    assert artifact_location("sqlite:////r/mlflow.db", "timemachine-char") == "/r/mlruns/timemachine-char"
    assert artifact_location("sqlite:////r/mlflow.db", "../escape") == "/r/mlruns"
    assert artifact_location("http://127.0.0.1:5000", "timemachine-char") is None


def test_summary_names_never_mix_with_the_per_epoch_series():
    assert mlflow_name("test_ppl") == "test_ppl" and mlflow_name("best_val_ppl") == "best_val_ppl"
    assert mlflow_name("val_ppl") == "summary.val_ppl"
    assert all(mlflow_name(k).startswith("summary.") for k in CURVE_FIELDS)


def test_curves_png_without_tracking(tmp_path):
    history = [{"epoch": e, "train_ppl": 20.0 / e, "val_ppl": 22.0 / e} for e in (1, 2, 3)]
    record_curves_png(tmp_path / "curves.png", history, Tracker(None), title="rnn")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracking_off_creates_no_store(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with tracked_run(shipped(Tracking, enabled=False), EXPERIMENT, "rnn", {}) as tracker:
        tracker.log_params({"train.lr": 0.1})
        tracker.log_metrics({"val_ppl": 3.0}, step=1)
        record_summary(tmp_path / "train.json", {"best_val_ppl": 3.0}, tracker)
    assert tracker.run_id is None
    assert "tracking: off" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.json"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, empty_store) -> Path:
    """A repository root whose mlflow.db the in-process tests share (a copy of the session's
    empty store: its migrations are paid once); each test uses its own experiment."""
    folder = tmp_path_factory.mktemp("repo")
    store_copy(empty_store, folder)
    return folder


@pytest.mark.slow  # a new SQLite store: ~7 s of schema migrations, once per module
def test_a_run_in_a_dvc_temp_copy_goes_to_the_parent_repository(repo, tmp_path, monkeypatch):
    """DVC_ROOT = parent repo, cwd = temp copy: store, artifacts and all go to the parent; the
    dataset input is logged without MLflow's 'interpreted in multiple ways' warning."""
    copy = tmp_path / "copy"
    (copy / "tokens").mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.chdir(copy)
    history = [{"epoch": 1, "train_ppl": 9.0, "val_ppl": 10.0}, {"epoch": 2, "train_ppl": 7.0, "val_ppl": 8.0}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracked_run(shipped(Tracking, enabled=True, experiment="temp-copy"), EXPERIMENT, "rnn", {}) as tracker:
            tracker.log_dataset(np.arange(100), "tokens", f"{EXPERIMENT}-train", "ab" * 20, "training")
            record_curves_png(copy / "curves.png", history, tracker, title="rnn")
    assert not [w for w in caught if "interpreted in multiple ways" in str(w.message)]

    uri = f"sqlite:///{repo.resolve()}/mlflow.db"
    assert (repo / "mlflow.db").is_file()
    assert sorted(p.name for p in copy.iterdir()) == ["curves.png", "tokens"]  # no store, no mlruns
    [run] = only_experiment_runs(uri, experiment="temp-copy")
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(str(repo.resolve() / "mlruns" / "temp-copy"))
    assert [a.path for a in client(uri).list_artifacts(run.info.run_id, "curves")] == ["curves/curves.png"]
    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.source_type == "local"
    assert json.loads(inp.dataset.source) == {"uri": str((copy / "tokens").resolve())}
    assert inp.dataset.digest == ("ab" * 20)[:36]


@pytest.mark.slow
def test_a_sqlite_store_is_opened_and_written_one_stage_at_a_time(repo, monkeypatch):
    """Parallel stages take turns at a SQLite store under `<store>.lock` (rnnlab/tracking/store.py):
    while another process holds it, a stage neither opens its run nor writes to it, and after
    LOCK_SECONDS of waiting it stops with one line naming the lock file."""
    from filelock import FileLock

    from rnnlab.errors import UserError
    from rnnlab.tracking import store

    uri = f"sqlite:///{repo}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(store, "LOCK_SECONDS", 0.5)
    lock_file = f"{repo}/mlflow.db.lock"
    other_stage = FileLock(lock_file, thread_local=False)
    cfg = shipped(Tracking, enabled=True, experiment="turns")
    with other_stage:
        with pytest.raises(UserError, match=rf"waited 0.5 s for the MLflow store lock {lock_file}, held by "
                                            "another stage; if no other stage runs, delete the file"):
            with tracked_run(cfg, EXPERIMENT, "rnn", {}):
                pass
    with tracked_run(cfg, EXPERIMENT, "rnn", {}) as tracker:  # its turn: the run opens
        with other_stage, pytest.raises(UserError, match="waited 0.5 s for the MLflow store lock"):
            tracker.log_params({"train.lr": 0.1})  # a write waits for the lock too
        tracker.log_params({"train.lr": 0.1})
    [run] = only_experiment_runs(uri, experiment="turns")
    assert run.data.params == {"train.lr": "0.1"}


@pytest.mark.slow
@pytest.mark.parametrize("raised, status", [(RuntimeError("boom"), "FAILED"),
                                            (KeyboardInterrupt(), "KILLED")])
def test_a_run_that_raises_is_not_left_running(repo, monkeypatch, raised, status):
    uri = f"sqlite:///{repo}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(type(raised)):
        with tracked_run(shipped(Tracking, enabled=True, experiment=f"raises-{status}"), EXPERIMENT, "rnn", {}):
            raise raised
    assert [r.info.status for r in only_experiment_runs(uri, experiment=f"raises-{status}")] == [status]


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_with_status_143(repo, monkeypatch, capsys):
    uri = f"sqlite:///{repo}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        with tracked_run(shipped(Tracking, enabled=True, experiment="sigterm"), EXPERIMENT, "rnn", {}):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises long before this ends
    assert exit_info.value.code == 143
    assert "ended KILLED" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    assert [r.info.status for r in only_experiment_runs(uri, experiment="sigterm")] == ["KILLED"]


@pytest.mark.slow
def test_a_run_is_continued_only_by_its_own_experiment(repo, monkeypatch):
    """docs/tracking.md's rule: a stage adds to a run only if the run is its experiment's (and,
    for an evaluation, not evaluated yet); anything else gets a new run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo}/mlflow.db")
    cfg = shipped(Tracking, enabled=True, experiment="ownership")

    def stage(exp: str | None, continue_run=None, evaluation=False, tags=None):
        if exp:
            monkeypatch.setenv("DVC_EXP_NAME", exp)
        else:
            monkeypatch.delenv("DVC_EXP_NAME", raising=False)
        with tracked_run(cfg, EXPERIMENT, "rnn", tags or ({"rnnlab.dvc_exp": exp} if exp else {}),
                         continue_run=continue_run, evaluation=evaluation) as tracker:
            return tracker.run_id, tracker.reopened

    base, _ = stage("base")
    assert stage("warm", continue_run=base)[1] is False                # another experiment
    assert stage(None, continue_run=base)[1] is False                  # the workspace
    assert stage("base", continue_run=base) == (base, True)            # its own (a resume)
    evaluated = {"rnnlab.evaluated": "true"}
    assert stage("base", base, evaluation=True, tags=evaluated) == (base, True)   # evaluates it
    again, reopened = stage("base", base, evaluation=True, tags=evaluated)        # a second time
    assert not reopened and again != base
    assert stage("base", continue_run="0" * 32)[1] is False            # gone from the store
    runs = only_experiment_runs(f"sqlite:///{repo}/mlflow.db", experiment="ownership")
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_a_variant_stage_run_is_named_and_tagged_with_what_made_it(repo, monkeypatch, tmp_path):
    """stage_run: a training's run carries git, DVC, variant, data and threads; its evaluation
    adds only the link to it; a second evaluation gets a run of its own, tagged as its own,
    with a note naming the training run."""
    import torch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo}/mlflow.db")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-x")
    monkeypatch.delenv("DVC_STAGE", raising=False)
    (tmp_path / "params.yaml").write_text("train: {}\n")
    cfg = shipped(Tracking, enabled=True, experiment="stage-runs")
    experiment = experiment_name({"corpus": "timemachine", "token": "char"})
    assert experiment == EXPERIMENT

    def open_run(**kw):
        with stage_run(cfg, "gru", experiment, "d" * 40, tmp_path / "params.yaml", **kw) as t:
            return t.run_id, t.reopened

    trained, _ = open_run()
    assert open_run(continue_run=trained, evaluation=True) == (trained, True)
    own, reopened = open_run(continue_run=trained, evaluation=True)  # evaluated before
    assert not reopened and own != trained
    runs = {r.info.run_id: r for r in only_experiment_runs(f"sqlite:///{repo}/mlflow.db",
                                                           experiment="stage-runs")}
    train_tags, own_tags = runs[trained].data.tags, runs[own].data.tags
    for tags in (train_tags, own_tags):
        assert tags["mlflow.runName"] == "gru [exp-x]" and tags["rnnlab.dvc_exp"] == "exp-x"
        assert tags["rnnlab.variant"] == "gru" and tags["rnnlab.data_sha1"] == "d" * 40
        assert {"rnnlab.git_commit", "rnnlab.params_sha1", "rnnlab.pipeline"} <= set(tags)
    assert train_tags["rnnlab.dvc_stage"] == "train@gru"  # the evaluation left it as it was
    assert train_tags["rnnlab.threads"] == str(torch.get_num_threads())
    assert train_tags["rnnlab.evaluated"] == "true" and train_tags["rnnlab.train_run_id"] == trained
    assert own_tags["rnnlab.dvc_stage"] == "evaluate@gru" and "rnnlab.threads" not in own_tags
    assert own_tags["rnnlab.train_run_id"] == trained and trained in own_tags["mlflow.note.content"]


@pytest.mark.slow
def test_a_resumed_run_logs_each_epoch_once(repo, monkeypatch, tmp_path):
    """Killed after saving epoch 3's resumable state but before logging it: the resumed run logs
    epoch 3 once, and epochs 1-2 are not logged again."""
    uri = f"sqlite:///{repo}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    row = {"train_ppl": 9.0, "val_ppl": 10.0, "tokens_per_sec": 1.0, "grad_norm": 1.0,
           "clipped_frac": 0.0, "lr": 0.1, "seconds": 1.0}
    history = [{**row, "epoch": e} for e in (1, 2, 3)]
    with tracked_run(shipped(Tracking, enabled=True, experiment="resumed"), EXPERIMENT, "rnn", {}) as tracker:
        for e in (1, 2):  # the first process logged epochs 1 and 2, then died
            record_curves(tmp_path / "c.csv", history[:e], tracker)
        run_id = tracker.run_id
    with tracked_run(shipped(Tracking, enabled=True, experiment="resumed"), EXPERIMENT, "rnn", {},
                     continue_run=run_id) as tracker:
        record_curves(tmp_path / "c.csv", history, tracker, resumed=True)
    steps = [m.step for m in client(uri).get_metric_history(run_id, "val_ppl")]
    assert sorted(steps) == [1, 2, 3]
    assert (tmp_path / "c.csv").read_text().count("\n") == 4  # header + 3 epochs


# ---------------------------------------------------------------------------------------------
# slow: the real train and evaluate stages against a SQLite store


@pytest.fixture(scope="module")
def tiny_runs(experiments) -> dict:
    """The runs of `dvc exp run -n exp-b -S train.lr=0.05` in the session's experiments (the
    real train and evaluate stages, tests/repos.py), whose outputs the workspace holds."""
    base = experiments.repo
    uri = f"sqlite:///{base}/mlflow.db"
    runs = {r.data.tags["rnnlab.variant"]: r
            for r in only_experiment_runs(uri, "tags.\"rnnlab.dvc_exp\" = 'exp-b'")}
    return {"base": base, "uri": uri, "runs": runs}


@pytest.mark.slow
def test_one_finished_run_per_variant_with_its_settings(tiny_runs):
    runs = tiny_runs["runs"]
    assert sorted(runs) == sorted(TINY_VARIANTS)
    for v, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"{v} [exp-b]"
        p = run.data.params
        assert {"train.lr", "train.clip_theta", "train.num_steps", "train.hidden_size", "model.cell"} <= set(p)
        assert float(p["train.lr"]) == 0.05 and p["train.num_steps"] == "8"
        assert p["model.cell"] == TINY_VARIANTS[v]["cell"]
        assert p["model.num_layers"] == str(TINY_VARIANTS[v].get("num_layers", 1))
        assert p["train.hidden_size"] == "16"


@pytest.mark.slow
def test_per_epoch_series_and_summary_metrics(tiny_runs):
    c = client(tiny_runs["uri"])
    for run in tiny_runs["runs"].values():
        for series in ("train_ppl", "val_ppl", "tokens_per_sec", "grad_norm", "lr"):
            steps = [m.step for m in c.get_metric_history(run.info.run_id, series)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), series
        assert {"best_val_ppl", "best_epoch", "test_ppl", "summary.val_ppl", "uniform_ppl"} <= set(run.data.metrics)
        assert 1 <= run.data.metrics["best_epoch"] <= EPOCHS


@pytest.mark.slow
def test_a_runs_times_are_its_trainings(tiny_runs):
    """DVC trains every variant, then evaluates each into its training's run: the run of the
    variant trained first ends before the next variant's training began (before, the evaluation
    set its end, after every training), and the run's evaluation time is its metric."""
    first, second = (tiny_runs["runs"][v] for v in TINY_VARIANTS)  # in dvc.yaml's order
    assert first.info.start_time < first.info.end_time <= second.info.start_time
    assert second.info.end_time > second.info.start_time
    assert all(r.data.metrics["eval_seconds"] > 0 for r in (first, second))


@pytest.mark.slow
def test_mlflow_and_the_metrics_files_agree_to_the_digit(tiny_runs):
    base = tiny_runs["base"]
    for v, run in tiny_runs["runs"].items():
        for path in (base / "models" / v / "train.json", base / "metrics" / "variants" / f"{v}.json"):
            numbers = {k: x for k, x in json.loads(path.read_text()).items()
                       if isinstance(x, (int, float)) and not isinstance(x, bool)}
            assert "test_ppl" in numbers or "best_val_ppl" in numbers
            for k, x in numbers.items():
                assert run.data.metrics[mlflow_name(k)] == x, (path.name, k)
        assert json.loads((base / "models" / v / "train.json").read_text())["mlflow_run_id"] == run.info.run_id


@pytest.mark.slow
def test_tags_artifacts_and_dataset(tiny_runs):
    c = client(tiny_runs["uri"])
    for v, run in tiny_runs["runs"].items():
        tags = run.data.tags
        for key in ("rnnlab.git_commit", "rnnlab.dvc_stage", "rnnlab.pipeline", "rnnlab.data_sha1"):
            assert tags.get(key), key
        assert tags["rnnlab.dvc_stage"] == f"train@{v}" and tags["rnnlab.dvc_exp"] == "exp-b"
        arts = {a.path for folder in ("checkpoint", "curves", "samples")
                for a in c.list_artifacts(run.info.run_id, folder)}
        assert {"checkpoint/best.pt", "checkpoint/vocab.json", f"curves/{v}.csv", "curves/curves.png",
                f"samples/{v}.md"} <= arts
        assert run.info.artifact_uri.startswith(str(tiny_runs["base"]))  # beside the store
        [inp] = run.inputs.dataset_inputs
        assert inp.dataset.name == f"{EXPERIMENT}-train"
        assert inp.dataset.digest == tags["rnnlab.data_sha1"][:36]
        assert [t.value for t in inp.tags if t.key == "mlflow.data.context"] == ["training"]


@pytest.mark.slow
def test_the_runs_of_one_pipeline_or_experiment_are_one_search(tiny_runs):
    """The filters docs/tracking.md gives, exactly as written there."""
    uri = tiny_runs["uri"]
    by_pipeline: dict[str, set] = {}
    for r in tiny_runs["runs"].values():
        by_pipeline.setdefault(r.data.tags["rnnlab.pipeline"], set()).add(r.info.run_id)
    # one value for both runs (same commit, same params.yaml), unless a commit landed in this
    # work tree between the two train stages; either way the filter finds exactly its runs
    for pid, run_ids in by_pipeline.items():
        for filter_string in (f"tags.\"rnnlab.pipeline\" = '{pid}'", f"tags.`rnnlab.pipeline` = '{pid}'"):
            assert {r.info.run_id for r in only_experiment_runs(uri, filter_string)} == run_ids
    found = only_experiment_runs(uri, "tags.\"rnnlab.dvc_exp\" = 'exp-b'")
    assert {r.info.run_id for r in found} == {r.info.run_id for r in tiny_runs["runs"].values()}
    assert only_experiment_runs(uri, "tags.\"rnnlab.dvc_exp\" = 'other'") == []
    docs = (ROOT / "docs" / "tracking.md").read_text()
    assert "tags.\"rnnlab.pipeline\" = '" in docs and "tags.\"rnnlab.dvc_exp\" = '" in docs


@pytest.mark.slow
def test_a_diverging_run_fails_with_one_line_and_is_marked_failed(tokens, tmp_path, new_store):
    params = tiny_params(tmp_path / "params.yaml", train={"lr": 1.0e6, "optimizer": "sgd"})
    uri = new_store(tmp_path)
    proc = run_in_process("train", *train_args(params, "rnn", tokens, tmp_path), env=stage_env(tmp_path, uri))
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: training diverged") and "Traceback" not in proc.stderr
    assert [r.info.status for r in only_experiment_runs(uri)] == ["FAILED"]


@pytest.mark.slow
def test_sigterm_during_training_marks_the_run_killed(tokens, tmp_path):
    params = tiny_params(tmp_path / "params.yaml", train={"epochs": 300})  # ~0.1 s each
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.Popen([PY, "-m", "stages.train", *map(str, train_args(params, "rnn", tokens, tmp_path))],
                            cwd=ROOT, env=stage_env(tmp_path, uri), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # wait for the first epoch line: the run exists and is training
        while not (line := proc.stdout.readline()).startswith("epoch   1/300"):
            if not line:
                pytest.fail(f"no epoch line; stderr:\n{proc.stderr.read()}")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    [run] = only_experiment_runs(uri)
    assert run.info.status == "KILLED"
    assert (tmp_path / "checkpoints" / "rnn" / "resume.pt").is_file()  # the next run resumes


@pytest.mark.slow
def test_tracking_off_stage_writes_no_store(tokens, tmp_path):
    params = tiny_params(tmp_path / "params.yaml", tracking={"enabled": False})
    out = ok(run_in_process("train", *train_args(params, "rnn", tokens, tmp_path), env=stage_env(tmp_path, None)))
    assert "tracking: off" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert json.loads((tmp_path / "models" / "rnn" / "train.json").read_text())["mlflow_run_id"] is None


# ---------------------------------------------------------------------------------------------
# slow: a real `mlflow server` on 127.0.0.1


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free port with a SQLite backend and artifacts in tmp_path (tests/repos.py)."""
    with server_on(f"sqlite:///{tmp_path}/server.db", tmp_path,
                   "--artifacts-destination", str(tmp_path / "server-artifacts")) as server:
        yield server.url, server.stop


@pytest.mark.slow
def test_a_tracking_server_gets_the_run_and_losing_it_is_one_error_after_training(tokens, tmp_path, mlflow_server):
    url, stop = mlflow_server
    params = tiny_params(tmp_path / "params.yaml")
    env = stage_env(tmp_path, url)
    ok(run_in_process("train", *train_args(params, "rnn", tokens, tmp_path), env=env))

    exp = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name",
                       params={"experiment_name": EXPERIMENT}, timeout=10).json()["experiment"]
    found = requests.post(f"{url}/api/2.0/mlflow/runs/search",
                          json={"experiment_ids": [exp["experiment_id"]]}, timeout=10).json()["runs"]
    [run] = found
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    train_json = json.loads((tmp_path / "models" / "rnn" / "train.json").read_text())
    assert metrics["best_val_ppl"] == train_json["best_val_ppl"] and metrics["val_ppl"] > 1
    assert any((tmp_path / "server-artifacts").rglob("best.pt"))  # uploaded through the server
    assert not (tmp_path / "mlflow.db").exists()

    # the server goes away in the middle of a run: the training goes on, its writes wait; at the
    # end, after tracking.patience seconds, one error naming the server, and the state is kept
    long = tiny_params(tmp_path / "long.yaml", train={"epochs": 30}, tracking={"patience": 1})
    proc = subprocess.Popen([PY, "-m", "stages.train", *map(str, train_args(long, "rnn", tokens, tmp_path / "lost"))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (line := proc.stdout.readline()).startswith("epoch   1/30"):
            if not line:
                pytest.fail(f"no epoch line; stderr:\n{proc.stderr.read()}")
        stop()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err
    assert "epoch  30/30" in out  # the training did not stop for the server
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: lost the MLflow tracking server at {url}: it did not answer for 1 s"), err
    assert "Traceback" not in err
    assert (tmp_path / "lost" / "checkpoints" / "rnn" / "resume.pt").exists()

    # a server that is down: the stage says so at once, before any training or run (no retries:
    # one look at /health, whose refusal the line quotes)
    proc = run_in_process("train", *train_args(params, "rnn", tokens, tmp_path / "again"), env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: the MLflow tracking server at {url} is unreachable")
    assert "epoch" not in proc.stdout and "Traceback" not in proc.stderr
    assert "does not answer" not in proc.stderr and "MLflow run" not in proc.stdout


@pytest.mark.slow  # imports MLflow
def test_a_dataset_another_stage_made_at_the_same_moment_is_logged_on_a_second_try(monkeypatch):
    """Two trainings on the same data starting together race for the server's dataset row (seen:
    PostgreSQL's `duplicate key ... "dataset_pk"`): the loser tries once more and finds it. Any
    other error is raised as it is."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from rnnlab.tracking.tracker import _log_input

    calls = []

    def log_input(dataset, context):
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException('(psycopg.errors.UniqueViolation) duplicate key value violates unique '
                                  'constraint "dataset_pk" [SQL: INSERT INTO datasets ...]')

    monkeypatch.setattr(mlflow, "log_input", log_input)
    _log_input(object(), "training")
    assert calls == ["training", "training"]

    def refused(dataset, context):
        raise MlflowException("permission denied", error_code="PERMISSION_DENIED")

    monkeypatch.setattr(mlflow, "log_input", refused)
    with pytest.raises(MlflowException, match="permission denied"):
        _log_input(object(), "training")
