"""Resume only what the same settings, data and code made (rnnlab/training/resume.py), and say why not."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from rnnlab.config import Train
from rnnlab.models.lm import ModelConfig
from rnnlab.training.checkpoint import save_resume
from rnnlab.kernels import choice
from rnnlab.training.resume import fingerprint, kernel_changes, kernel_record, load_resumable
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
    assert found.why_not.startswith("the code (rnnlab/batches.py, ") and "\n" not in found.why_not
    assert "rnnlab/models/lm.py" in found.why_not and "settings" not in found.why_not
