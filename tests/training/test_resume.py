"""Resume only what the same settings, data and code made (rnnlab/training/resume.py), and say why not."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnlab.config import Train
from rnnlab.data.corpus import Tokens
from rnnlab.data.vocab import build_vocab
from rnnlab.models.lm import ModelConfig, build_model
from rnnlab.training import resume
from rnnlab.training.checkpoint import save_resume
from rnnlab.kernels import choice
from rnnlab.training.loop import train_summary
from rnnlab.training.resume import (
    fingerprint,
    kernel_changes,
    kernel_record,
    kernel_tags,
    load_resumable,
    resumed_state,
    train_epochs,
)
from stages import TRAIN
from tests.conftest import shipped

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(vocab_size=28, cell="rnn", impl="torch", hidden_size=16)
SNAPSHOT = {"epoch": 3, "weights": torch.zeros(4)}


@pytest.fixture
def fp():
    return fingerprint(MODEL, shipped(Train, threads=1), "d" * 40, TRAIN, ROOT)


def test_the_fingerprint_covers_the_train_stage_code(fp):
    assert {"stages/train.py", "rnnlab/training/loop.py", "rnnlab/models/lm.py", "rnnlab/kernels/fused.py",
            "rnnlab/training/resume.py"} <= set(fp.code)
    assert "stages/evaluate.py" not in fp.code and "stages/report.py" not in fp.code
    assert fp.torch == torch.__version__


def test_the_fingerprint_covers_the_compiled_loops_source(fp):
    """No import names rnnlab/kernels/csrc/recurrence.cpp, yet the native path runs it."""
    assert "rnnlab/kernels/csrc/recurrence.cpp" in fp.code
    assert len(fp.code["rnnlab/kernels/csrc/recurrence.cpp"]) == 40


def test_the_same_fingerprint_resumes_with_its_run(tmp_path, fp):
    save_resume(tmp_path / "resume.pt", SNAPSHOT, asdict(fp), mlflow_run_id="abc")
    found = load_resumable(tmp_path, fp)
    assert found.snapshot["epoch"] == 3 and found.run_id == "abc" and found.why_not is None


def test_nothing_saved_is_no_resume_and_no_reason(tmp_path, fp):
    assert load_resumable(tmp_path, fp) == type(load_resumable(tmp_path, fp))()


@pytest.mark.parametrize("change, reason", [
    (lambda f: dataclasses.replace(f, code={**f.code, "rnnlab/training/loop.py": "0" * 40}),
     "the code (rnnlab/training/loop.py) changed"),
    (lambda f: dataclasses.replace(f, code={**f.code, "rnnlab/new.py": "0" * 40}),
     "the code (rnnlab/new.py) changed"),
    (lambda f: dataclasses.replace(f, code={**f.code, "rnnlab/kernels/csrc/recurrence.cpp": "0" * 40}),
     "the code (rnnlab/kernels/csrc/recurrence.cpp) changed"),
    (lambda f: dataclasses.replace(f, settings="0" * 40), "the settings changed"),
    (lambda f: dataclasses.replace(f, data="0" * 40), "the data changed"),
    (lambda f: dataclasses.replace(f, torch="1.0"), f"PyTorch (1.0 -> {torch.__version__}) changed"),
    (lambda f: dataclasses.replace(f, settings="0" * 40, data="1" * 40), "the settings and the data changed"),
])
def test_other_code_settings_data_or_torch_start_over_saying_why(tmp_path, fp, change, reason):
    save_resume(tmp_path / "resume.pt", SNAPSHOT, asdict(change(fp)), mlflow_run_id="abc")
    found = load_resumable(tmp_path, fp)
    assert found.snapshot is None and found.run_id is None
    assert found.why_not.startswith(reason), found.why_not
    assert found.why_not.endswith(f"since {tmp_path / 'resume.pt'} was saved")


def test_the_kernel_path_is_saved_with_the_state_and_a_change_is_named(tmp_path, fp, monkeypatch):
    paths = {"layer gru torch: 1 layer(s) x 16": "native", "product mkl x 64": "onednn"}
    monkeypatch.setattr(choice, "chosen", lambda: dict(paths))
    save_resume(tmp_path / "resume.pt", SNAPSHOT, asdict(fp), kernels=kernel_record())
    saved = load_resumable(tmp_path, fp).kernels
    assert saved["paths"] == paths and saved["machine"] == choice.machine()
    assert kernel_changes(saved) == []  # the same paths again
    paths["layer gru torch: 1 layer(s) x 16"] = "fused"  # another CPU measured another winner
    paths["layer rnn torch: new shape"] = "native"  # a decision the saved epochs never made
    assert kernel_changes(saved) == ["layer gru torch: 1 layer(s) x 16: native -> fused"]
    assert kernel_changes(None) == []  # a state from before the paths were kept


def test_a_state_saved_by_an_older_version_starts_over(tmp_path, fp):
    save_resume(tmp_path / "resume.pt", SNAPSHOT, "3f2a9c")  # the former single-hash fingerprint
    assert "older version of rnnlab" in load_resumable(tmp_path, fp).why_not


def test_a_damaged_state_starts_over_saying_so(tmp_path, fp):
    (tmp_path / "resume.pt").write_bytes(b"garbage")
    found = load_resumable(tmp_path, fp)
    assert found.snapshot is None and "not a readable checkpoint" in found.why_not


def test_settings_fingerprint_follows_the_settings(fp):
    assert fingerprint(MODEL, shipped(Train, threads=1, lr=0.5), "d" * 40, TRAIN, ROOT).settings != fp.settings
    assert fingerprint(MODEL, shipped(Train, threads=1), "d" * 40, TRAIN, ROOT) == fp


def test_a_resume_file_written_before_the_package_layout_starts_over_naming_the_code(tmp_path, fp):
    """tests/fixtures/premove/resume.pt, saved by the code of bcb6cf0 (its files were rnnlab/*.py):
    the same settings and data, but other code files, so not resumed, and the line says so."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "tests/fixtures/premove/resume.pt", work / "resume.pt")
    cfg = shipped(Train, hidden_size=8, threads=1, epochs=12, bf16=False)  # the defaults of then
    model = ModelConfig(vocab_size=24, cell="gru", impl="torch", hidden_size=8)
    found = load_resumable(work, fingerprint(model, cfg, "0" * 40, TRAIN, ROOT))
    assert found.snapshot is None
    assert found.why_not.startswith("the code (rnnlab/") and "\n" not in found.why_not
    assert "rnnlab/batches.py, " in found.why_not  # a file of then that is no more
    assert "rnnlab/models/lm.py" in found.why_not and "settings" not in found.why_not


# ---------------------------------------------------------------------------------------------
# train_epochs: the epoch loop as the train stage runs it

TEXT = "the time traveller was expounding a recondite matter to us "
CPU = torch.device("cpu")


class Tagged:
    """A stand-in for the stage's Tracker with tracking off: the tags it was given, in order."""

    run_id = None

    def __init__(self):
        self.tags: list[dict] = []

    def set_tags(self, tags: dict) -> None:
        self.tags.append(dict(tags))


def tiny_training(work: Path, epochs: int):
    """(state, tokens, cfg, fingerprint, resumable) of a 4-unit rnn on 1,200 tokens."""
    vocab = build_vocab(list(TEXT))
    ids = np.array(vocab.encode(list(TEXT * 20)))
    tokens = Tokens(splits={"train": ids, "val": ids[:200], "test": ids[:200]}, vocab=vocab,
                    stats={})
    cfg = shipped(Train, hidden_size=4, num_steps=8, batch_size=4, epochs=epochs, threads=1,
                  device="cpu", bf16=False)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(vocab), cell="rnn", impl="torch", hidden_size=4))
    fp = fingerprint(model.config, cfg, "0" * 40, TRAIN, ROOT)
    state, found = resumed_state(model, cfg, work, fp, "rnn")
    return state, found, tokens, cfg, fp


def test_an_epoch_reaches_the_stage_saved_and_tagged_with_the_kernel_choices_once(tmp_path):
    state, found, tokens, cfg, fp = tiny_training(tmp_path, epochs=3)
    run = Tagged()
    for result in train_epochs(state, tokens, cfg, CPU, tmp_path, fp, found, run, "rnn"):
        saved = torch.load(tmp_path / "resume.pt", weights_only=True)
        assert saved["epoch"] == result.epoch and (tmp_path / "best.pt").is_file()
    assert state.epoch == 3 and state.pruned_at is None
    assert run.tags == [kernel_tags()]  # the same choices every epoch: tagged once


@pytest.mark.parametrize("prune_at, epochs_run", [(2, 2), (4, 4), (None, 4)],
                         ids=["pruned", "at-the-last-epoch", "never"])
def test_a_study_hears_every_epoch_and_a_prune_before_the_last_stops_the_training(
        tmp_path, monkeypatch, capsys, prune_at, epochs_run):
    """rnnlab tune's pruner stops a training after an epoch that is not its last; train.json says
    where (pruned_at), and the run is tagged; a prune at the last epoch changes nothing."""
    heard = []

    def report(epoch: int, val_ppl: float) -> bool:
        heard.append(epoch)
        return epoch == prune_at

    monkeypatch.setattr(resume, "reporter", lambda variant: report)
    state, found, tokens, cfg, fp = tiny_training(tmp_path, epochs=4)
    run = Tagged()
    results = list(train_epochs(state, tokens, cfg, CPU, tmp_path, fp, found, run, "rnn"))
    assert [r.epoch for r in results] == heard == list(range(1, epochs_run + 1))
    summary = train_summary(state, cfg, CPU, run_id=None)
    keys = ["best_epoch", "best_val_ppl", "final_train_ppl", "epochs", "tokens_per_sec",
            "train_seconds", "parameters", "device", "precision", "mlflow_run_id"]
    out = capsys.readouterr().out
    if epochs_run < 4:
        assert state.pruned_at == 2 and "rnn: pruned by the study after epoch 2 of 4" in out
        assert run.tags[-1] == {"rnnlab.pruned": "true", "rnnlab.pruned_at": "2"}
        assert list(summary) == keys[:4] + ["pruned_at"] + keys[4:] and summary["pruned_at"] == 2
    else:
        assert state.pruned_at is None and "pruned" not in out
        assert list(summary) == keys and not any("rnnlab.pruned" in t for t in run.tags)
    assert summary["epochs"] == 4
    assert summary["parameters"] == sum(p.numel() for p in state.model.parameters())


def test_a_resumed_run_on_another_kernel_path_says_so_once(tmp_path, monkeypatch, capsys):
    state, found, tokens, cfg, fp = tiny_training(tmp_path, epochs=3)
    found = dataclasses.replace(found, snapshot=state.snapshot())
    state.epoch = 1  # as if resumed after epoch 1
    changed = ["layer rnn torch: fused -> native"]
    monkeypatch.setattr(resume, "kernel_changes", lambda saved: changed)
    run = Tagged()
    list(train_epochs(state, tokens, cfg, CPU, tmp_path, fp, found, run, "rnn"))
    out = capsys.readouterr().out
    assert out.count("the kernel path changed") == 1
    assert ("rnn: the kernel path changed after epoch 1 (layer rnn torch: fused -> native); "
            "continuing") in out
    assert {"rnnlab.kernels_changed": "after epoch 1: layer rnn torch: fused -> native"} in run.tags
