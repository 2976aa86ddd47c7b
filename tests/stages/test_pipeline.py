"""End to end: the real `dvc repro` on a temp copy of the repository, with tiny settings."""

import pytest
import yaml

from tests.repos import BIN, copy_repo, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"))


def test_repro_runs_every_stage_then_is_a_noop(repo):
    out = run([str(BIN / "dvc"), "repro"], repo)
    for stage in ("download", "tokenize", "train@rnn_scratch", "train@lstm", "evaluate@lstm", "report"):
        assert f"Running stage '{stage}'" in out
    vocab_size = len(yaml.safe_load((repo / "data/tokens/vocab.json").read_text())["tokens"])
    for name in ("rnn_scratch", "lstm"):
        metrics = yaml.safe_load((repo / "metrics/variants" / f"{name}.json").read_text())
        assert {"train_ppl", "val_ppl", "test_ppl", "tokens_per_sec", "epochs", "best_epoch"} <= set(metrics)
        assert 1 < metrics["test_ppl"] < 1.5 * vocab_size and metrics["uniform_ppl"] == vocab_size
        assert "time traveller" in (repo / "metrics/samples" / f"{name}.md").read_text()
        assert (repo / "metrics/curves" / f"{name}.csv").read_text().count("\n") == 3  # header + 2 epochs
        assert (repo / "models" / name / "best.pt").is_file()
    assert (repo / "metrics/plots/val_ppl.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lstm |" in (repo / "metrics/report.md").read_text()
    assert not (repo / "checkpoints").exists() or not any((repo / "checkpoints").iterdir())

    again = run([str(BIN / "dvc"), "repro"], repo)
    assert "Running stage" not in again


def test_changing_lr_reruns_train_and_evaluate_only(repo):
    run([str(BIN / "dvc"), "repro"], repo)
    out = run([str(BIN / "dvc"), "exp", "run", "-S", "train.lr=0.05"], repo)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@rnn_scratch", "train@lstm", "evaluate@rnn_scratch", "evaluate@lstm", "report"}
    show = run([str(BIN / "dvc"), "exp", "show", "--csv"], repo)
    assert "metrics/variants/lstm.json:test_ppl" in show


def test_changing_token_type_reruns_from_tokenize(repo):
    run([str(BIN / "dvc"), "repro"], repo)
    status = run([str(BIN / "dvc"), "status"], repo)
    assert "up to date" in status
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tokenize"]["token"] = "word"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([str(BIN / "dvc"), "repro", "tokenize"], repo)
    assert "Running stage 'tokenize'" in out and "Running stage 'download'" not in out
