"""`rnnlab compare` and the one comparison table (rnnlab/tracking/table.py) that it, the report stage and
`presets --results` print: which settings count as differing, Markdown and CSV, rows read from
DVC experiment refs of a small git repository, from the workspace and from an MLflow run."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rnnlab.cli import compare
from rnnlab.config import flatten, resolve_train, validate_params
from rnnlab.errors import run_main
from rnnlab.tracking.table import (
    VARIANT,
    by_test_ppl,
    comparison,
    differing,
    render,
    row,
    variant_settings,
)
from tests.conftest import shipped, shipped_params

ROOT = Path(__file__).resolve().parents[2]


def results(test_ppl: float, best_epoch: int = 2, **extra) -> dict:
    """A metrics JSON as evaluate writes it (the keys the table reads)."""
    return {"train_ppl": test_ppl - 1, "val_ppl": test_ppl - 0.5, "test_ppl": test_ppl, "uniform_ppl": 28,
            "final_train_ppl": test_ppl - 1.5, "tokens_per_sec": 12345.6, "epochs": 3,
            "best_epoch": best_epoch, "train_seconds": 7.4, **extra}


# --- the table ------------------------------------------------------------------------------------


def test_differing_settings_known_answer():
    rows = [{"settings": {"train.lr": "0.1", "data.corpus": "timemachine", "model.cell": "rnn", "train.seed": "0"}},
            {"settings": {"train.lr": "0.2", "data.corpus": "timemachine", "model.cell": "gru", "train.seed": "0"}},
            {"settings": {"train.lr": "0.1", "data.corpus": "custom", "model.cell": "rnn"}}]  # no train.seed
    # by section (model, train, data, ...), not by first appearance; a missing value is not another value
    assert differing(rows) == ["model.cell", "train.lr", "data.corpus"]
    assert differing(rows, always=("train.seed",)) == ["model.cell", "train.lr", "train.seed", "data.corpus"]
    assert differing(rows[:1]) == [] and differing([]) == []


def test_markdown_known_answer():
    rows = [row("exp-b", "gru", results(5.25, extra="x"), validate_params(shipped_params({"train": {"lr": 0.01}}))),
            {"source": "run 0123abcd", "variant": "a|b", "settings": {"train.lr": "0.002"}}]  # no results
    assert comparison(rows) == (
        "| experiment | variant | train ppl | val ppl | test ppl | best epoch | tokens/s | train s | train.lr |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---|\n"
        "| exp-b | gru | 4.250 | 4.750 | 5.250 | 2/3 | 12,346 | 7 | 0.01 |\n"
        "| run 0123abcd | a\\|b | - | - | - | - | - | - | 0.002 |\n")


def test_csv_has_the_values_as_they_are():
    params = validate_params(shipped_params({"variants": {"rnn": {"cell": "rnn"}, "big": {"cell": "rnn", "hidden_size": 512}}}))
    rows = [row("workspace", "rnn", results(6.123456), params), row("workspace", "big", {}, params)]
    text = comparison(rows, fmt="csv")
    got = list(csv.DictReader(io.StringIO(text)))
    assert list(got[0]) == ["experiment", "variant", "train ppl", "val ppl", "test ppl", "best epoch", "tokens/s",
                            "train s", "train.hidden_size"]
    assert got[0]["test ppl"] == "6.123456" and got[0]["tokens/s"] == "12345.6" and got[0]["best epoch"] == "2"
    assert got[1]["test ppl"] == "" and got[1]["train.hidden_size"] == "512"
    with pytest.raises(ValueError, match="allowed: markdown, csv"):
        render(rows, (VARIANT,), "html")


def test_rows_sort_by_test_perplexity_missing_last():
    rows = [{"source": "c", "test_ppl": None}, {"source": "b", "test_ppl": 7.0}, {"source": "a", "test_ppl": 5.0}]
    assert [r["source"] for r in sorted(rows, key=by_test_ppl)] == ["a", "b", "c"]


def test_settings_are_named_and_written_as_the_mlflow_params_of_a_run():
    """A workspace row and an MLflow row of the same settings differ in nothing (no false columns)."""
    from rnnlab.models.lm import model_config
    from rnnlab.tracking.records import run_params

    params = validate_params(shipped_params({"variants": {"deep": {"cell": "lstm", "num_layers": 2, "embed_size": 8,
                                                                   "train": {"lr": 1e-5, "dropout": 0.1}}}}))
    model = model_config(params.variants["deep"], resolve_train(params, "deep"), 28)
    logged = {**run_params(params, "deep", model, 1234), **flatten({"evaluate": params.evaluate})}
    as_mlflow = {k: "null" if v is None else str(v) for k, v in logged.items()}  # Tracker.log_params
    settings = variant_settings(params, "deep")
    assert settings == compare.run_settings(as_mlflow)
    assert settings["train.lr"] == "1e-05" and settings["model.num_layers"] == "2" and settings["data.source"] == "null"


# --- DVC experiments and the workspace, in a small git repository ---------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def write(repo: Path, params: dict, metrics: dict[str, dict], extra: dict[str, str] | None = None) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    shutil.rmtree(repo / "metrics", ignore_errors=True)
    for variant, m in metrics.items():
        (repo / "metrics/variants").mkdir(parents=True, exist_ok=True)
        (repo / f"metrics/variants/{variant}.json").write_text(json.dumps(m))
    for rel, text in (extra or {}).items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)


def add_experiment(repo: Path, name: str, params: dict, metrics: dict[str, dict],
                   extra: dict[str, str] | None = None) -> str:
    """Commit files as `dvc exp run` does, on top of HEAD, under refs/exps/<baseline>/<name>, in a
    worktree beside: the workspace is left as it was."""
    baseline = git(repo, "rev-parse", "HEAD")
    work = repo.parent / f"exp-{name}"
    git(repo, "worktree", "add", "-q", "--detach", str(work), baseline)
    write(work, params, metrics, extra)
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", f"dvc: commit experiment {name}")
    ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
    git(work, "update-ref", ref, "HEAD")
    git(repo, "worktree", "remove", "--force", str(work))
    return ref


TWO = {"rnn": {"cell": "rnn"}, "lstm": {"cell": "lstm"}}


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repo: the workspace ran the shipped settings (rnn 6.0, lstm 5.0); experiment `lr-high`
    ran train.lr=0.05 (rnn 9.0, lstm 4.0); experiment `partial` ran lstm alone, with 2 layers."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo, shipped_params({"variants": TWO}), {"rnn": results(6.0), "lstm": results(5.0)})
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "baseline")
    add_experiment(repo, "lr-high", shipped_params({"variants": TWO, "train": {"lr": 0.05}}),
                   {"rnn": results(9.0), "lstm": results(4.0)})
    add_experiment(repo, "partial", shipped_params({"variants": {**TWO, "lstm": {"cell": "lstm", "num_layers": 2}}}),
                   {"lstm": results(4.5)})
    monkeypatch.chdir(repo)
    return repo


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`rnnlab compare ARGV`, as rnnlab/cli/main.py runs it: (exit status, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="rnnlab")
    compare.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", *argv])
    try:
        run_main(lambda: args.run(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_experiment_refs_newest_name_only(repo):
    refs = compare.experiment_refs()
    assert set(refs) == {"partial", "lr-high"}  # newest first; made in the same second here
    assert all(r.startswith("refs/exps/") and r.endswith(n) for n, r in refs.items())
    assert compare.git_show(refs["lr-high"], "metrics/variants/rnn.json") is not None
    assert compare.git_show(refs["partial"], "metrics/variants/rnn.json") is None


def test_no_name_is_the_workspace_and_every_experiment(repo, capsys):
    code, out, err = cli(capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == ("| experiment | variant | train ppl | val ppl | test ppl | best epoch | tokens/s | train s | "
                        "model.cell | model.num_layers | train.lr |")
    # best test perplexity first; partial's rnn, which it did not run, is left out
    assert [tuple(c.strip() for c in line.split("|")[1:3]) for line in lines[2:]] == [
        ("lr-high", "lstm"), ("partial", "lstm"), ("workspace", "lstm"), ("workspace", "rnn"), ("lr-high", "rnn")]
    assert "| lr-high | lstm | 3.000 | 3.500 | 4.000 | 2/3 | 12,346 | 7 | lstm | 1 | 0.05 |" in lines
    assert "| partial | lstm | 3.500 | 4.000 | 4.500 | 2/3 | 12,346 | 7 | lstm | 2 | 0.002 |" in lines


def test_named_sources_csv(repo, capsys):
    code, out, err = cli(capsys, "partial", "workspace", "--format", "csv")
    assert code == 0, err
    got = list(csv.DictReader(io.StringIO(out)))
    assert [(r["experiment"], r["variant"], r["test ppl"]) for r in got] == [
        ("partial", "lstm", "4.5"), ("workspace", "lstm", "5.0"), ("workspace", "rnn", "6.0"),
        ("partial", "rnn", "")]  # named: a variant it did not run is shown, without results
    assert [r["model.num_layers"] for r in got] == ["2", "1", "1", "1"]
    assert "train.lr" not in got[0]  # the same in all four


def test_workspace_params_and_metrics_are_read_from_disk(repo, capsys):
    params = shipped_params({"variants": {"rnn": {"cell": "rnn", "train": {"seed": 3}}}})
    write(repo, params, {"rnn": results(7.5)})
    code, out, _ = cli(capsys, "workspace", "lr-high", "--format", "csv")
    got = {(r["experiment"], r["variant"]): r for r in csv.DictReader(io.StringIO(out))}
    assert got[("workspace", "rnn")]["test ppl"] == "7.5" and got[("workspace", "rnn")]["train.seed"] == "3"
    assert got[("lr-high", "rnn")]["train.seed"] == "0" and ("workspace", "lstm") not in got


def test_an_unknown_name_is_one_error_listing_what_exists(repo, capsys):
    code, out, err = cli(capsys, "workspace", "nope")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: no experiment or run 'nope'; DVC experiments: ")
    assert set(err.split("DVC experiments: ")[1].split(";")[0].split(", ")) == {"partial", "lr-high"}
    assert err.rstrip().endswith("; also `workspace` (the files on disk), or an MLflow run id (32 hex digits)")


def test_a_run_id_without_a_store_is_one_error_and_creates_none(repo, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo}/none.db")
    code, _, err = cli(capsys, "ab" * 16)
    assert code == 2 and err.startswith(f"error: no MLflow run {'ab' * 16}: there is no tracking store at")
    assert not (repo / "none.db").exists()


def test_an_experiment_of_invalid_params_is_left_out_with_a_note(repo, capsys):
    bad = shipped_params({"variants": TWO, "train": {"lr": -1}})
    add_experiment(repo, "bad-lr", bad, {"rnn": results(3.0)})
    code, out, err = cli(capsys)
    assert code == 0 and "bad-lr" not in out and "lr-high" in out
    assert "compare: left out experiment bad-lr: params.yaml: train.lr = -1" in err
    code, _, err = cli(capsys, "bad-lr")
    assert code == 2 and "error: bad-lr: params.yaml: train.lr = -1" in err


def test_an_experiment_from_before_a_key_was_added_still_compares(repo, capsys):
    old = shipped_params({"variants": TWO, "train": {"lr": 0.3}})
    del old["tracking"]["register"]  # made before tracking.register existed
    add_experiment(repo, "old-exp", old, {"rnn": results(3.0)})
    code, out, err = cli(capsys)
    assert code == 0 and "| old-exp | rnn | 2.000 | 2.500 | 3.000 |" in out and "left out" not in err
    assert cli(capsys, "old-exp")[0] == 0


def test_nothing_to_compare(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not a git repository, no params.yaml
    code, _, err = cli(capsys)
    assert code == 2 and "nothing to compare yet" in err


# --- the report stage and presets --results print the same table ---------------------------------


def test_report_table_shows_the_model_always_and_what_differs(params_dict):
    from stages.report import report_table

    params_dict["variants"]["rnn"]["train"] = {"lr": 0.5}
    params = validate_params(params_dict)
    table = report_table(params, {"rnn": results(7.0), "lstm_scratch": results(6.0)})
    lines = table.splitlines()
    assert lines[0] == ("| variant | train ppl | val ppl | test ppl | best epoch | tokens/s | train s | model.cell | "
                        "model.impl | model.num_layers | train.lr | train.hidden_size |")
    assert lines[2] == "| lstm_scratch | 5.000 | 5.500 | 6.000 | 2/3 | 12,346 | 7 | lstm | scratch | 1 | 0.01 | 16 |"
    assert lines[3].startswith("| rnn | 6.000 |") and lines[3].endswith("| rnn | torch | 1 | 0.5 | 16 |")
    assert lines[-1] == "A uniform model's perplexity (the vocabulary size): 28."


def test_presets_results_from_an_experiment_ref(repo):
    from rnnlab.cli.presets import load_preset, merged, results_table

    folder = repo / "presets"
    folder.mkdir()
    for name in ("book-gru", "book-lstm"):
        shutil.copy(ROOT / "presets" / f"{name}.yaml", folder)
    params = merged(shipped_params(), load_preset("book-gru", folder))
    add_experiment(repo, "book-gru", params, {"book_gru": results(8.65, best_epoch=129, epochs=500, final_train_ppl=1.04)},
                   {"metrics/curves/book_gru.csv": "epoch,train_ppl,val_ppl\n1,9,10\n2,1.1,193.04\n",
                    "metrics/samples/book_gru.md": "# Samples\n\n- greedy: `time traveller the the`\n"})
    out = results_table(["book-gru", "book-lstm"], "params.yaml", folder=folder)
    lines = out.splitlines()
    assert lines[0].startswith("| preset | variant | train ppl | val ppl | test ppl | best epoch | tokens/s | train s | "
                               "book | train ppl, last epoch | val ppl, last epoch | greedy sample | model.cell |")
    assert lines[2].startswith("| book-gru | book_gru | 7.650 | 8.150 | 8.650 | 129/500 | 12,346 | 7 | "
                               "training perplexity 1.1 | 1.04 | 193.0 | `time traveller the the` | gru |")
    assert lines[3].startswith("| book-lstm | book_lstm | - | - | - | - | - | - | training perplexity 1.2 | - | - | "
                               "not run yet | lstm |")
    assert "train.lr" not in lines[0]  # both presets: SGD lr 1


def test_report_and_presets_use_the_shared_table():
    """One formatter: neither writes a Markdown table of its own."""
    for path in ("stages/report.py", "rnnlab/cli/presets.py"):
        text = (ROOT / path).read_text()
        assert "|---" not in text and "comparison(" in text, path


# --- an MLflow run, logged by the stages' own code paths -------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with a training run evaluated in place, and a training run whose evaluation
    has a run of its own (the training restored from DVC's cache in another experiment)."""
    from rnnlab.config import Tracking
    from rnnlab.models.lm import model_config
    from rnnlab.tracking.records import record_summary, run_params
    from rnnlab.tracking.runs import tracked_run

    base = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{base}/mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    params = validate_params(shipped_params({"variants": TWO, "train": {"lr": 0.01}}))
    cfg = shipped(Tracking, experiment="compare", patience=0)

    def train(variant: str, exp: str | None) -> str:
        mp.setenv("DVC_EXP_NAME", exp) if exp else mp.delenv("DVC_EXP_NAME", raising=False)
        model = model_config(params.variants[variant], resolve_train(params, variant), 28)
        with tracked_run(cfg, "x", variant, {"rnnlab.variant": variant, **({"rnnlab.dvc_exp": exp} if exp else {})}) as t:
            t.log_params(run_params(params, variant, model, 999))
            t.log_metrics({"val_ppl": 99.0, "train_ppl": 98.0, "tokens_per_sec": 1.0}, step=3)  # a per-epoch point
            record_summary(base / f"{variant}-train.json", {"best_epoch": 3, "best_val_ppl": 5.5, "epochs": 3,
                                                           "tokens_per_sec": 12345.6, "train_seconds": 7.4}, t)
            return t.run_id

    def evaluate(variant: str, train_run: str, exp: str | None) -> str:
        mp.setenv("DVC_EXP_NAME", exp) if exp else mp.delenv("DVC_EXP_NAME", raising=False)
        model = model_config(params.variants[variant], resolve_train(params, variant), 28)
        tags = {"rnnlab.evaluated": "true", "rnnlab.train_run_id": train_run}
        with tracked_run(cfg, "x", variant, tags, continue_run=train_run, evaluation=True) as t:
            if not t.reopened:
                t.set_tags({"rnnlab.variant": variant, **({"rnnlab.dvc_exp": exp} if exp else {})})
                t.log_params(run_params(params, variant, model, 999))
            t.log_params(flatten({"evaluate": params.evaluate}))
            record_summary(base / f"{variant}.json", results(5.0 if variant == "lstm" else 6.0), t)
            return t.run_id

    lstm = train("lstm", None)
    assert evaluate("lstm", lstm, None) == lstm  # evaluated in its own training run
    rnn = train("rnn", "warm")
    rnn_eval = evaluate("rnn", rnn, "cold")      # another experiment: a run of its own, linked
    assert rnn_eval != rnn
    mp.undo()
    return {"uri": uri, "lstm": lstm, "rnn": rnn, "rnn_eval": rnn_eval}


@pytest.mark.slow  # a new SQLite store: seconds of schema migrations
def test_mlflow_runs_beside_the_workspace(store, repo, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    write(repo, shipped_params({"variants": TWO, "train": {"lr": 0.01}}), {"rnn": results(6.0), "lstm": results(5.0)})
    code, out, err = cli(capsys, store["lstm"], store["rnn"], store["rnn_eval"], "workspace", "--format", "csv")
    assert code == 0, err
    got = list(csv.DictReader(io.StringIO(out)))
    names = [r["experiment"] for r in got]
    assert names[:2] == [f"run {store['lstm'][:8]}", "workspace"]  # test ppl 5, then 6
    assert sorted(names[2:]) == sorted([f"run {store['rnn'][:8]} (warm)", f"run {store['rnn_eval'][:8]} (cold)",
                                        "workspace"])
    # the summaries, not the last per-epoch point; the linked evaluation's test perplexity
    for r in got:
        assert (r["train ppl"], r["val ppl"], r["best epoch"], r["tokens/s"]) == (
            ("4.0", "4.5", "2", "12345.6") if r["variant"] == "lstm" else ("5.0", "5.5", "2", "12345.6")), r
    # the same settings from MLflow and from params.yaml: only the cell differs
    assert list(got[0])[8:] == ["model.cell"]


@pytest.mark.slow
def test_an_unknown_run_id_names_the_store(store, repo, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    code, _, err = cli(capsys, "0" * 32)
    assert code == 2 and err.strip() == f"error: no MLflow run {'0' * 32} at {store['uri']} (MLFLOW_TRACKING_URI)"
