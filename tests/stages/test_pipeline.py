"""End to end: the real `dvc repro` on a temp copy of the repository, with tiny settings (the
session's `pipeline` and `experiments`, tests/repos.py)."""

import json

import pytest
import yaml

from tests.repos import TINY_VARIANTS, dvc, edit_params

pytestmark = pytest.mark.slow


def test_repro_runs_every_stage_then_is_a_noop(pipeline):
    repo, out = pipeline.repo, pipeline.output["repro"]
    for stage in ("download", "tokenize", "train@rnn_scratch", "train@lstm", "evaluate@lstm", "report"):
        assert f"Running stage '{stage}'" in out
    vocab_size = len(yaml.safe_load((repo / "data/tokens/vocab.json").read_text())["tokens"])
    for name in TINY_VARIANTS:
        metrics = json.loads((repo / "metrics/variants" / f"{name}.json").read_text())
        assert {"train_ppl", "val_ppl", "test_ppl", "tokens_per_sec", "epochs", "best_epoch"} <= set(metrics)
        assert 1 < metrics["test_ppl"] < 1.5 * vocab_size and metrics["uniform_ppl"] == vocab_size
        assert "time traveller" in (repo / "metrics/samples" / f"{name}.md").read_text()
        assert (repo / "metrics/curves" / f"{name}.csv").read_text().count("\n") == 3  # header + 2 epochs
        assert (repo / "models" / name / "best.pt").is_file()
    assert (repo / "metrics/plots/val_ppl.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lstm |" in (repo / "metrics/report.md").read_text()
    assert not (repo / "checkpoints").exists() or not any((repo / "checkpoints").iterdir())

    assert "Running stage" not in dvc("repro", cwd=repo)


def test_the_evaluate_stage_scores_the_best_checkpoint_as_training_validated_it(pipeline):
    """Two processes, two code paths to one number: the train stage's validation of its best
    epoch (train.json) and the evaluate stage's validation perplexity of that checkpoint."""
    for name in TINY_VARIANTS:
        trained = json.loads((pipeline.repo / "models" / name / "train.json").read_text())
        evaluated = json.loads((pipeline.repo / "metrics/variants" / f"{name}.json").read_text())
        assert evaluated["val_ppl"] == trained["best_val_ppl"], name
        assert evaluated["best_epoch"] == trained["best_epoch"]


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_changing_lr_reruns_train_and_evaluate_only(experiments):
    # `dvc exp run -n exp-a -S train.lr=0.01`, then `-n exp-b -S train.lr=0.05`
    for name in ("exp-a", "exp-b"):
        assert ran(experiments.output[name]) == {"train@rnn_scratch", "train@lstm", "evaluate@rnn_scratch",
                                                 "evaluate@lstm", "report"}
    show = dvc("exp", "show", "--csv", cwd=experiments.repo)
    assert "metrics/variants/lstm.json:test_ppl" in show


def test_changing_token_type_reruns_from_tokenize(pipeline, tmp_path):
    repo = pipeline.copy(tmp_path / "repo")
    assert "up to date" in dvc("status", cwd=repo)
    edit_params(repo, lambda p: p["tokenize"].update(token="word"))
    out = dvc("repro", "tokenize", cwd=repo)
    assert "Running stage 'tokenize'" in out and "Running stage 'download'" not in out
