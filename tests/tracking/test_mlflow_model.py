"""The trained model as an MLflow Model: logged by the Tracker, loaded in a fresh Python with
`mlflow.pyfunc.load_model("runs:/<id>/model")`, and the same text as the project's own sampling."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnlab.data.vocab import build_vocab
from rnnlab.models.lm import ModelConfig, build_model
from rnnlab.tracking.mlflow_model import RNNLMPredictor, requirements, signature
from rnnlab.training.checkpoint import load_checkpoint, save_checkpoint
from rnnlab.training.sampling import continuation
from tests.conftest import shipped

TEXT = "the time traveller for so it will be convenient to speak of him was expounding"


def tiny_checkpoint(path: Path, token_type: str = "char") -> Path:
    tokens = list(TEXT) if token_type == "char" else TEXT.split()
    vocab = build_vocab(tokens, token_type=token_type, normalize="book")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(vocab), cell="gru", impl="torch", hidden_size=24))
    save_checkpoint(path, model, vocab, variant="gru")
    return path


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def logged_run(tmp_path: Path, checkpoint: Path) -> str:
    """A run whose Tracker logged `checkpoint` as its model, as the train stage does."""
    from rnnlab.config import Tracking
    from rnnlab.tracking.runs import tracked_run

    cfg = shipped(Tracking, experiment="t", patience=0)
    with tracked_run(cfg, "t", "gru", {}) as tracker:
        tracker.log_artifact(checkpoint, "checkpoint")
        tracker.log_model(checkpoint, example="the time")
        assert tracker.pending == []
    return tracker.run_id


@pytest.mark.slow  # an MLflow store and a second Python: about 15 s
def test_a_logged_model_loads_in_a_fresh_python_and_continues_as_the_project_does(tmp_path, store):
    ckpt = tiny_checkpoint(tmp_path / "best.pt")
    run_id = logged_run(tmp_path, ckpt)
    script = f"""
import json, mlflow
m = mlflow.pyfunc.load_model("runs:/{run_id}/model")
greedy = m.predict(["Time Traveller!", "the"], params={{"num_tokens": 12}})
sampled = m.predict(["the"], params={{"num_tokens": 12, "temperature": 0.9, "top_k": 5, "seed": 3}})
print(json.dumps({{"greedy": greedy.to_dict("records"), "sampled": sampled.to_dict("records"),
                  "params": {{p.name: p.default for p in m.metadata.signature.params.params}}}}))
"""
    # the kernels of this process (conftest.py), so both continue with the same code
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "RNNLAB_KERNEL": "reference", "RNNLAB_PRODUCT": "mkl"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    model, vocab, _ = load_checkpoint(ckpt)
    expect = [continuation(model, vocab, p, 12, None, torch.Generator().manual_seed(0))
              for p in ("Time Traveller!", "the")]
    assert [(r["prefix"], r["continuation"]) for r in got["greedy"]] == expect
    assert got["greedy"][0]["prefix"] == "time traveller"  # normalised as the corpus (book)
    assert len(got["greedy"][0]["continuation"]) == 12
    sampled = continuation(model, vocab, "the", 12, 0.9, torch.Generator().manual_seed(3), 5)
    assert (got["sampled"][0]["prefix"], got["sampled"][0]["continuation"]) == sampled
    assert got["params"] == {"num_tokens": 50, "temperature": 0.0, "top_k": 0, "seed": 0,
                             "exclude_unk": None}


@pytest.mark.slow
def test_the_model_folder_holds_weights_config_vocabulary_and_no_pickle(tmp_path, store):
    import mlflow
    import yaml

    run_id = logged_run(tmp_path, tiny_checkpoint(tmp_path / "best.pt"))
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / "dl")))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert "data/best.pt" in files and "MLmodel" in files and "input_example.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "rnnlab.tracking.mlflow_model"
    assert mlmodel["run_id"] == run_id
    payload = torch.load(local / "data/best.pt", weights_only=True)  # tensors, numbers, strings only
    assert {"model_config", "state_dict", "vocab"} <= set(payload)
    assert payload["vocab"]["normalize"] == "book"
    reqs = (local / "requirements.txt").read_text().split()
    assert "rnnlab==0.1.0" in reqs and f"torch=={torch.__version__.split('+')[0]}" in reqs
    # the run shows it: MLflow 3 links the logged model to the run (the UI's Models column)
    experiment = mlflow.get_run(run_id).info.experiment_id
    models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    assert [(m.name, m.source_run_id) for m in models] == [("model", run_id)]


ROOT = Path(__file__).resolve().parents[2]
PREMOVE = ROOT / "tests" / "fixtures" / "premove"


@pytest.mark.slow  # imports MLflow's model machinery: seconds
def test_a_model_logged_before_the_package_layout_still_loads_and_continues_alike():
    """tests/fixtures/premove/mlflow-model: an MLflow Model logged by the code of bcb6cf0, when the
    loader was `rnnlab.mlflow_model` (a tiny untrained gru). Its sampled text is what that code's
    own predict returned for it then."""
    import mlflow
    import yaml

    mlmodel = yaml.safe_load((PREMOVE / "mlflow-model" / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "rnnlab.mlflow_model"
    model = mlflow.pyfunc.load_model(str(PREMOVE / "mlflow-model"))
    got = model.predict(["the time"], params={"num_tokens": 20, "temperature": 1.0, "seed": 3})
    assert got.to_dict("records") == [{"prefix": "the time", "continuation": "uaclmvmxl nmsmcdbeuc"}]


def test_a_checkpoint_written_before_the_package_layout_still_loads():
    """tests/fixtures/premove/best.pt, saved by the code of bcb6cf0: the same text as above."""
    model, vocab, meta = load_checkpoint(PREMOVE / "best.pt")
    assert (model.config.cell, model.config.impl, model.config.hidden_size) == ("gru", "torch", 8)
    assert meta["variant"] == "gru" and meta["epoch"] == 1
    text = continuation(model, vocab, "the time", 20, 1.0, torch.Generator().manual_seed(3))
    assert text == ("the time", "uaclmvmxl nmsmcdbeuc")


@pytest.mark.slow  # imports MLflow's model machinery: seconds
def test_signature_params_are_the_generation_options_with_their_defaults():
    """The defaults `rnnlab generate` documents (README, `rnnlab generate --help`): 50 tokens,
    greedy, every token, seed 0, <unk> left out for word tokens only."""
    params = {p.name: (p.to_dict()["type"], p.default) for p in signature().params.params}
    assert params == {"num_tokens": ("long", 50), "temperature": ("double", 0.0), "top_k": ("long", 0),
                      "seed": ("long", 0), "exclude_unk": ("boolean", None)}
    assert [c.name for c in signature().outputs.inputs] == ["prefix", "continuation"]


@pytest.mark.slow  # imports MLflow's model machinery: seconds
def test_requirements_pin_what_trained_it():
    """What loading needs: this package and the pins of pyproject.toml, which the venv was made
    from (tests/test_lock.py holds the lock to them)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(d.split("  #")[0].strip().split("==") for d in project["dependencies"])
    assert requirements() == [f"rnnlab=={project['version']}", f"torch=={pins['torch']}",
                              f"mlflow=={pins['mlflow']}", f"pandas=={pins['pandas']}"]


@pytest.mark.slow  # imports MLflow's model machinery: seconds
def test_predict_takes_a_list_a_table_or_a_string_and_rejects_bad_params(tmp_path):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = RNNLMPredictor(tiny_checkpoint(tmp_path / "best.pt"))
    a = model.predict(["the time"], {"num_tokens": 5})
    b = model.predict(pd.DataFrame({"prefix": ["the time"]}), {"num_tokens": 5})
    c = model.predict("the time", {"num_tokens": 5})
    assert a.equals(b) and a.equals(c) and len(a.loc[0, "continuation"]) == 5
    for inputs, params, reason in ((["the"], {"temperature": -1.0}, r"temperature = -1\.0: 0 \(greedy\) or a number >= 0\.001"),
                                   (["the"], {"num_tokens": 0}, "num_tokens = 0"),
                                   (["!!!"], {"num_tokens": 5}, "empty after the corpus's normalisation"),
                                   (42, None, "predict takes prefixes")):
        with pytest.raises(MlflowException, match=reason) as err:  # MLflow's own: a served model
            model.predict(inputs, params)                          # answers 400 with the reason
        assert err.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.slow  # imports MLflow's model machinery: seconds
def test_word_models_continue_with_words(tmp_path):
    model = RNNLMPredictor(tiny_checkpoint(tmp_path / "best.pt", token_type="word"))
    out = model.predict(["the time"], {"num_tokens": 4}).loc[0]
    assert out["prefix"] == "the time" and len(out["continuation"].split()) == 4
    assert out["continuation"].startswith(" ")


def test_top_k_1_sampling_is_greedy(tmp_path):
    model, vocab, _ = load_checkpoint(tiny_checkpoint(tmp_path / "best.pt"))
    greedy = continuation(model, vocab, "the time", 20)
    top1 = continuation(model, vocab, "the time", 20, 5.0, torch.Generator().manual_seed(1), 1)
    hot = continuation(model, vocab, "the time", 20, 5.0, torch.Generator().manual_seed(1), 0)
    assert top1 == greedy and hot != greedy


@pytest.mark.slow  # an MLflow store: about 15 s
def test_the_champion_alias_moves_only_to_a_better_model_of_the_same_data(tmp_path, store, capsys):
    from mlflow import MlflowClient

    from rnnlab.config import Tracking
    from rnnlab.tracking.registry import ALIAS, register_if_better
    from rnnlab.tracking.runs import tracked_run

    ckpt = tiny_checkpoint(tmp_path / "best.pt")
    cfg = shipped(Tracking, experiment="t", patience=0)

    def train_and_register(val_ppl: float, data: str = "d1", with_model: bool = True) -> str:
        with tracked_run(cfg, "t", "gru", {}) as tracker:
            if with_model:
                tracker.log_model(ckpt, example="the time")
            tracker.register("lm", tracker.run_id, val_ppl, data)
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("registry:")][0]

    assert train_and_register(5.0) == f"registry: lm version 1 (val ppl 5) is now {ALIAS}"
    assert train_and_register(4.0) == f"registry: lm version 2 (val ppl 4) is now {ALIAS} (was version 1)"
    assert train_and_register(4.5) == f"registry: lm's {ALIAS} stays version 2 (val ppl 4 <= 4.5); nothing registered"
    assert "was trained on other data; nothing registered" in train_and_register(1.0, data="d2")
    assert "has no MLflow Model" in train_and_register(1.0, with_model=False)
    client = MlflowClient()
    champion = client.get_model_version_by_alias("lm", ALIAS)
    assert int(champion.version) == 2 and champion.tags["rnnlab.val_ppl"] == "4.0"
    assert len(client.search_model_versions("name = 'lm'")) == 2
    assert register_if_better("lm", champion.run_id, 4.0, "d1") == \
        f"registry: lm's {ALIAS} is already version 2, this model"
    assert register_if_better("lm", "0" * 32, 1.0, "d1") == \
        f"registry: training run {'0' * 32} is not in this store; nothing registered"

    # registered, then the server went away before the alias moved: the retry moves it, no copy
    with tracked_run(cfg, "t", "gru", {}) as tracker:
        tracker.log_model(ckpt, example="the time")
    import mlflow

    mlflow.register_model(f"runs:/{tracker.run_id}/model", "lm", tags={"rnnlab.val_ppl": "3.0",
                                                                       "rnnlab.data_sha1": "d1"})
    assert register_if_better("lm", tracker.run_id, 3.0, "d1") == \
        f"registry: lm version 3 (val ppl 3) is now {ALIAS} (was version 2)"
    assert len(client.search_model_versions("name = 'lm'")) == 3


@pytest.mark.slow  # `mlflow models serve`: about 10 s to start
def test_a_served_model_answers_bad_and_oversized_requests_with_400_in_one_line(tmp_path):
    """A real `mlflow models serve` of a logged model, its bounds set in its environment: a bad
    param and each bound exceeded is a 400 whose message ends with the one-line reason, answered
    within a second; a request within them is answered."""
    import socket
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RNNLAB_SERVE_MAX_ROWS": "3", "RNNLAB_SERVE_MAX_PREFIX_CHARS": "40",
           "RNNLAB_SERVE_MAX_TOKENS": "20", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve",
                               "-m", str(PREMOVE / "mlflow-model"), "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        good = requests.post(url, json={"inputs": ["the time"], "params": {"num_tokens": 5}}, timeout=60)
        assert good.status_code == 200 and good.json() == {
            "predictions": [{"prefix": "the time", "continuation": "kaaaa"}]}
        for request, reason in (
            ({"inputs": ["the time"], "params": {"temperature": -1.0}},
             "temperature = -1.0: 0 (greedy) or a number >= 0.001"),
            ({"inputs": ["the time"], "params": {"temperature": 1e-300}},
             "temperature = 1e-300: 0 (greedy) or a number >= 0.001"),
            ({"inputs": ["the time"], "params": {"seed": 2**70}},
             f"seed = {2**70}: an integer >= 0 and < 2**63"),
            ({"inputs": ["the"] * 4}, "prefixes per request: 4 is over the server's bound 3 "
                                      "(RNNLAB_SERVE_MAX_ROWS)"),
            ({"inputs": ["t" * 100_000]}, "characters per prefix: 100000 is over the server's bound "
                                          "40 (RNNLAB_SERVE_MAX_PREFIX_CHARS)"),
            ({"inputs": ["the"], "params": {"num_tokens": 10**7}},
             "num_tokens: 10000000 is over the server's bound 20 (RNNLAB_SERVE_MAX_TOKENS)"),
        ):
            start = time.monotonic()
            bad = requests.post(url, json=request, timeout=60)
            took = time.monotonic() - start
            assert bad.status_code == 400, (request, bad.text)
            body = bad.json()
            assert body["error_code"] == "INVALID_PARAMETER_VALUE", body
            assert body["message"].endswith(f"Error: {reason}"), body["message"]
            assert "Traceback" not in bad.text and "unexpected error" not in bad.text
            assert took < 1.0, (request, took)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
