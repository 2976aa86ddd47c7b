"""`rnnlab generate`: a model named by a checkpoint, a folder, a workspace variant or an MLflow
run id; options; and one `error:` line for each expected mistake."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rnnlab.cli.main import main
from rnnlab.kernels import choice
from rnnlab.training.checkpoint import load_checkpoint
from rnnlab.training.sampling import continuation
from tests.tracking.test_mlflow_model import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def generate(capsys, *args) -> tuple[int, str, str]:
    try:
        main(["generate", *map(str, args)])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder laid out as the repository: dvc.yaml, params.yaml, and models/gru/best.pt."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["variants"] = {"gru": {"cell": "gru"}, "lstm": {"cell": "lstm"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "models/gru").mkdir(parents=True)
    tiny_checkpoint(tmp_path / "models/gru/best.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return tmp_path


def test_a_checkpoint_file_a_folder_and_a_variant_give_the_same_greedy_text(workspace, capsys):
    model, vocab, _ = load_checkpoint(workspace / "models/gru/best.pt")
    expect = "".join(continuation(model, vocab, "The Time!", 15))
    choice.forget()  # the products are decided (measured or read) again, and must say nothing
    capsys.readouterr()
    for spec in ("models/gru/best.pt", "models/gru", "gru"):
        code, out, err = generate(capsys, spec, "The Time!", "-n", 15)
        assert code == 0, err
        assert out == expect + "\n"
        assert out.startswith("the time")  # normalised as the corpus (book)
        assert "gru/torch 1x24" in err and "kernels:" not in err
    code, out, err = generate(capsys, "gru", "the", "time", "-n", 3)
    assert code == 0 and len(out.splitlines()) == 2  # one line per prefix


def test_sampling_is_seeded_and_samples_differ(workspace, capsys):
    runs = [generate(capsys, "gru", "the", "-n", 30, "-t", 1.5, "--seed", seed, "--samples", 2)[1]
            for seed in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    first, second = runs[0].splitlines()
    assert first != second and first.startswith("the") and second.startswith("the")


def test_unknown_tokens_are_reported(workspace, capsys):
    code, out, err = generate(capsys, "gru", "the zq", "-n", 3)
    assert code == 0 and "'z', 'q' not in the vocabulary, read as <unk>" in err


@pytest.mark.parametrize("args, message", [
    (["nosuch", "the"], "'nosuch' is not a checkpoint file or folder, a variant of params.yaml "
                        "(gru, lstm), an MLflow run id (32 hex digits), or a DVC experiment"),
    (["lstm", "the"], "variant 'lstm' has no trained model at"),
    (["gru", "!!!"], "prefix '!!!' is empty after the corpus's normalisation (book)"),
    (["gru", "the", "-n", "0"], "num_tokens = 0: an integer >= 1"),
    (["gru", "the", "-t", "-1"], "temperature = -1.0: 0 (greedy) or a number >= 0.001"),
    (["gru", "the", "--samples", "0"], "--samples = 0: must be an integer >= 1"),
    (["models", "the"], "models: a folder without a best.pt"),
])
def test_expected_mistakes_are_one_error_line(workspace, capsys, args, message):
    code, out, err = generate(capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_a_damaged_checkpoint_is_one_error_line(workspace, capsys):
    (workspace / "bad.pt").write_bytes(b"not a zip")
    code, _, err = generate(capsys, "bad.pt", "the")
    assert code == 2 and err.startswith("error: bad.pt: not a readable checkpoint")


@pytest.mark.slow  # an MLflow store: about 10 s
def test_an_mlflow_run_id_and_its_evaluation_run(workspace, capsys, monkeypatch):
    import mlflow

    uri = f"sqlite:///{workspace}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as train:
        mlflow.log_artifact(str(workspace / "models/gru/best.pt"), "checkpoint")
    with mlflow.start_run(tags={"rnnlab.train_run_id": train.info.run_id}) as evaluation:
        pass
    with mlflow.start_run() as empty:
        pass
    mlflow.set_tracking_uri(None)
    direct = generate(capsys, "gru", "the", "-n", 20)[1]
    for run in (train, evaluation):
        code, out, err = generate(capsys, run.info.run_id, "the", "-n", 20)
        assert code == 0 and out == direct, err
        assert f"MLflow run {train.info.run_id}" in err
    code, _, err = generate(capsys, empty.info.run_id, "the")
    assert code == 2 and "has no model (checkpoint/best.pt)" in err
    code, _, err = generate(capsys, "0" * 32, "the")
    assert code == 2 and f"no MLflow run {'0' * 32} at sqlite:///" in err


@pytest.mark.slow  # a copy of the session's two DVC experiments (tests/repos.py)
def test_a_dvc_experiment_by_name_and_its_mlflow_run(experiments, tmp_path):
    import os
    import subprocess

    from tests.repos import BIN, dvc

    repo = experiments.copy(tmp_path / "repo")  # exp-a (lr 0.01), then exp-b (lr 0.05)

    def gen(*args) -> tuple[str, str]:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"}
        # sampled: tiny models' greedy text can be the same (all spaces); a seed keeps it exact
        proc = subprocess.run([str(BIN / "rnnlab"), "generate", *args, "the time", "-n", "40",
                               "-t", "1.0", "--seed", "7"],
                              cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, proc.stderr

    from_a, how = gen("exp-a", "--variant", "lstm")
    assert "model: DVC experiment exp-a, variant lstm" in how
    assert "kernels:" not in how  # text was asked for, not this machine's kernel measurements
    assert from_a != gen("exp-b", "--variant", "lstm")[0]  # the workspace holds exp-b's model
    dvc("exp", "apply", "exp-a", cwd=repo)
    assert gen("lstm")[0] == from_a  # exp-a's model came from DVC's cache, byte for byte

    scores = {v: json.loads((repo / f"metrics/variants/{v}.json").read_text())["val_ppl"]
              for v in ("lstm", "rnn_scratch")}
    assert f"variant {min(scores, key=scores.get)}:" in gen("exp-a")[1]  # no --variant: the best

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    train_run = mlflow.search_runs(experiment_names=["timemachine-char"], output_format="list",
                                   filter_string="tags.`rnnlab.dvc_exp` = 'exp-a' and "
                                                 "tags.`rnnlab.variant` = 'lstm'")[0]
    mlflow.set_tracking_uri(None)
    assert gen(train_run.info.run_id)[0] == from_a
