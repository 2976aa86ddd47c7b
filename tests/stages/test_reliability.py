"""Reliability: bad input gets one clear line, faults lose nothing, interrupted training resumes.

Each test backs one row of docs/reliability.md. Stages run for real (as subprocesses where the
exit status and the absence of a traceback are the point) on a tiny corpus with tiny models; every
file goes to tmp_path. Tests run as root here, which ignores permission bits, so a read-only
folder and a full disk are also simulated at the OS boundary (os.open, io.open) when needed.
"""

from __future__ import annotations

import copy
import errno
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import pydantic
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnlab.config import Data, Params, Train, Variant, load_params, validate_params
from rnnlab.data.corpus import load_tokens, save_tokens, tokenize_corpus
from rnnlab.data.download import prepare_raw
from rnnlab.data.vocab import build_vocab
from rnnlab.errors import UserError, run_main
from rnnlab.fileio import write_json, write_text
from rnnlab.models.lm import ModelConfig, build_model
from rnnlab.tracking.records import record_curves
from rnnlab.tracking.tracker import Tracker
from rnnlab.training.checkpoint import load_checkpoint, save_checkpoint, save_resume
from tests.conftest import shipped
from tests.stagerun import (
    TINY,
    eval_args,
    in_process,
    one_error,
    stage_env,
    tiny_params,
    train_args,
    write_params,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# What the test process runs (conftest.py: reference_kernels), forced in a stage's subprocess:
# a result compared bit for bit across processes must come from the same code in each.
REFERENCE = {"RNNLAB_KERNEL": "reference", "RNNLAB_PRODUCT": "mkl"}


def no_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# =============================================================================================
# Parameters: one line per problem, naming the key path, the value and what is allowed


def test_one_problem_is_one_line():
    with pytest.raises(UserError) as err:
        validate_params(tiny_params(train={"clip_thta": 1.0}))
    assert str(err.value) == (
        "params.yaml: train.clip_thta: unknown key; allowed: lr, clip_theta, num_steps, hidden_size, "
        "batch_size, epochs, optimizer, sampling, seed, device, dropout, lr_schedule, lr_decay, "
        "lr_decay_after, init_scale, weight_decay, bf16, threads")


def test_several_problems_are_one_line_each():
    with pytest.raises(UserError) as err:
        validate_params(tiny_params(train={"lr": -1, "num_steps": 0}, evaluate={"temperature": 0}))
    assert str(err.value).splitlines() == [
        "params.yaml: train.lr = -1: Input should be greater than 0",
        "params.yaml: train.num_steps = 0: Input should be greater than or equal to 1",
        "params.yaml: evaluate.temperature = 0: Input should be greater than 0",
    ]


@pytest.mark.parametrize("variant, expected", [
    ({"cell": "rnn", "train": {"lrr": 1}},
     "params.yaml: variants.rnn.train.lrr: unknown key; allowed: lr, clip_theta, num_steps, "
     "batch_size, epochs"),
    ({"cell": "rnn", "train": {"lr": 0}},
     "params.yaml: variants.rnn.train.lr = 0: Input should be greater than 0"),
    ({"cell": "rnn", "train": {"hidden_size": 8}},
     "params.yaml: variants.rnn.train.hidden_size = 8: set the variant's own hidden_size"),
    ({"cell": "rnn", "train": {"lr": None}},
     "params.yaml: variants.rnn.train.lr = None: Input should be a valid number"),
    ({"cell": "rnn", "train": ["lr", 1]},
     "params.yaml: variants.rnn.train = ['lr', 1]: Input should be a valid dictionary"),
])
def test_variant_override_errors_name_the_key(variant, expected):
    with pytest.raises(UserError) as err:
        validate_params(tiny_params(variants={"rnn": variant}))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_variant_name_error_is_readable():
    with pytest.raises(UserError) as err:
        validate_params(tiny_params(variants={"x y": {"cell": "rnn"}}))
    assert str(err.value) == (
        "params.yaml: variants: name 'x y': use only letters, digits, _ . and - "
        "(it names the stages train@<name>, evaluate@<name>)")


def test_empty_or_blank_prefix_is_rejected():
    for prefix in ("", "   "):
        with pytest.raises(UserError, match=r"evaluate.prefixes.0 = '\s*': a prefix needs at least one"):
            validate_params(tiny_params(evaluate={"prefixes": [prefix]}))


def test_scientific_notation_is_a_number(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-5` as text; `dvc exp run -S train.lr=1e-5` writes just that."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False).replace("lr: 0.01", "lr: 1e-05"))
    assert load_params(path).train.lr == 1e-5


@pytest.mark.slow  # trains
def test_stage_with_bad_params_prints_one_line_and_writes_nothing(tmp_path, tiny_tokens):
    write_params(tmp_path, tiny_params(train={"clip_thta": 1.0}, tracking={"enabled": True}))
    env = {**stage_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    line = one_error(in_process("train", *train_args(tmp_path, tiny_tokens), cwd=tmp_path, env=env))
    assert line.startswith(f"error: {tmp_path / 'params.yaml'}: train.clip_thta: unknown key; allowed: lr,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.slow  # trains
def test_batch_too_large_for_the_split_fails_before_any_run_or_file(tmp_path, tiny_tokens):
    write_params(tmp_path, tiny_params(train={"batch_size": 1000}, tracking={"enabled": True}))
    env = {**stage_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    line = one_error(in_process("train", *train_args(tmp_path, tiny_tokens), cwd=tmp_path, env=env))
    assert line == (
        "error: train.batch_size = 1000 with train.num_steps = 8 needs at least 8,009 training "
        "tokens, but the training split has 4,000; lower batch_size or num_steps, or enlarge the "
        "split (tokenize.split.train, data.max_tokens)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no mlflow.db, no outputs


# ---------------------------------------------------------------------------------------------
# property-based: random and mutated params never crash the validator nor slip through it

SECTIONS = {name: field.annotation for name, field in Params.model_fields.items()}
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    json_like,
    st.dictionaries(st.sampled_from([*SECTIONS, "trian"]), json_like, max_size=6),
    st.builds(lambda sec, key, val: tiny_params(**{sec: {key: val}}),
              st.sampled_from(["data", "tokenize", "train", "evaluate", "tracking"]),
              st.text(max_size=12), json_like),
))
def test_random_params_give_a_user_error_or_valid_params(raw):
    try:
        params = validate_params(raw)
    except UserError as err:
        assert str(err) and all(line.startswith("params.yaml: ") for line in str(err).splitlines())
        return
    assert isinstance(params, Params)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80) | st.binary(max_size=40))
def test_random_yaml_text_gives_a_user_error_or_valid_params(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    try:
        load_params(path)
    except UserError:
        pass


# Invalid by definition here, independently of rnnlab/config.py: (section, key) -> a strategy of
# values that key must reject.
not_a_number = st.text(max_size=5) | st.booleans() | st.none() | st.lists(st.integers(), max_size=2)
not_an_int = not_a_number | st.floats()  # strict: 3.0 is not an int either
non_positive = st.floats(max_value=0) | st.integers(max_value=0) | st.sampled_from([math.nan, math.inf])
below_one = st.integers(max_value=0)


def not_one_of(*allowed: str):
    return st.text(max_size=10).filter(lambda s: s not in allowed) | st.integers() | st.none()


INVALID = {
    ("train", "lr"): non_positive | not_a_number,
    ("train", "clip_theta"): non_positive | not_a_number,
    ("train", "num_steps"): below_one | not_an_int,
    ("train", "hidden_size"): below_one | not_an_int,
    ("train", "batch_size"): below_one | not_an_int,
    ("train", "epochs"): below_one | not_an_int,
    ("train", "seed"): st.integers(max_value=-1) | not_an_int,
    ("train", "dropout"): st.floats(min_value=1) | st.floats(max_value=0, exclude_max=True) | st.just(math.nan)
                          | not_a_number,
    ("train", "optimizer"): not_one_of("sgd", "adam"),
    ("train", "sampling"): not_one_of("sequential", "random"),
    ("train", "device"): not_one_of("auto", "cpu", "cuda"),
    ("train", "bf16"): st.integers() | st.text(max_size=5) | st.none(),
    ("tokenize", "token"): not_one_of("char", "word"),
    ("tokenize", "min_freq"): below_one | not_an_int,
    ("data", "corpus"): not_one_of("timemachine", "jaychou_lyrics", "custom"),
    ("data", "max_tokens"): below_one | not_a_number.filter(lambda v: v is not None),
    ("evaluate", "temperature"): non_positive | not_a_number,
    ("evaluate", "num_tokens"): below_one | not_an_int,
    ("evaluate", "prefixes"): st.lists(st.sampled_from(["", " ", "\n"]), min_size=1, max_size=2)
                              | st.text(max_size=4) | st.integers(),
    ("tracking", "enabled"): st.integers() | st.text(max_size=5) | st.none(),
}
TRAIN_KEYS = [key for (section, key) in INVALID if section == "train" and key != "hidden_size"]


@st.composite
def mutations(draw):
    """(params with one invalid setting, the key path its error must name)."""
    p = copy.deepcopy(TINY)
    kind = draw(st.sampled_from(["value", "override", "unknown", "enum", "split"]))
    if kind == "value":
        section, key = draw(st.sampled_from(sorted(INVALID)))
        p[section][key] = draw(INVALID[section, key])
        return p, f"{section}.{key}"
    if kind == "override":  # a variant's train override of a known key, with an invalid value
        key = draw(st.sampled_from(TRAIN_KEYS))
        p["variants"]["rnn"]["train"] = {key: draw(INVALID["train", key])}
        return p, f"variants.rnn.train.{key}"
    if kind == "unknown":  # a key no section has, e.g. a typo
        where = draw(st.sampled_from(["", "data", "tokenize", "train", "evaluate", "tracking",
                                      "variants.rnn", "variants.rnn.train", "tokenize.split"]))
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN_KEYS and k.isprintable()))
        node = p
        for part in filter(None, where.split(".")):
            node = node.setdefault(part, {})
        node[key] = draw(json_like)
        return p, f"{where}.{key}: unknown key" if where else f"{key}: unknown key"
    if kind == "enum":
        key = draw(st.sampled_from(["cell", "impl"]))
        p["variants"]["lstm"][key] = draw(not_one_of("rnn", "gru", "lstm", "scratch", "torch"))
        return p, f"variants.lstm.{key}"
    # split fractions: one outside (0, 1), or a sum clearly not 1
    fracs = draw(st.tuples(*[st.floats(-2, 3, allow_nan=False)] * 3).filter(
        lambda f: not all(0 < x < 1 for x in f) or abs(sum(f) - 1) > 1e-3))
    p["tokenize"]["split"] = dict(zip(("train", "val", "test"), fracs))
    return p, "tokenize.split"


def schema_keys(model=Params) -> set[str]:
    """Every key the params schema knows, at any depth (hypothesis also draws the code's own
    string constants, such as a real key: it is no typo)."""
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        for t in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(t, type) and issubclass(t, pydantic.BaseModel):
                keys |= schema_keys(t)
    return keys


KNOWN_KEYS = {"val", "test", *schema_keys(), *schema_keys(Variant)}


@settings(max_examples=400, deadline=None)
@given(mutations())
def test_mutated_params_are_rejected_naming_the_key(mutation):
    params, path = mutation
    with pytest.raises(UserError) as err:
        validate_params(params)
    assert f"params.yaml: {path}" in str(err.value)


@settings(max_examples=100, deadline=None)
@given(lr=st.floats(min_value=1e-9, max_value=1e3), steps=st.integers(1, 10_000),
       split=st.floats(0.05, 0.9))
def test_valid_values_are_accepted(lr, steps, split):
    rest = (1 - split) / 2
    p = tiny_params(train={"lr": lr, "num_steps": steps},
                    tokenize={"split": {"train": split, "val": rest, "test": 1 - split - rest}})
    assert validate_params(p).train.lr == lr


# =============================================================================================
# Faults during training


def mlflow_runs(db: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids)


@pytest.mark.parametrize("lr, tracked, message", [
    (1.0e+6, True,  # the largest lr the schema allows: the loss explodes within the first epoch
     r"error: training diverged: (the loss became (inf|nan) at epoch 1, step \d+|after epoch 1 the "
     r"training loss is \S+ and the validation perplexity \S+); lower train.lr or "
     r"train.clip_theta and run again \(nothing of this epoch was saved\)"),
    (1000.0, False,  # finite but huge losses: exp(mean loss) overflows (caught by run_epochs, or
     # failing that by stages/train.py)
     r"error: training diverged: (after epoch 1 the training loss is \S+ and the validation "
     r"perplexity \S+); "
     r"lower train.lr or train.clip_theta and run again \(nothing of this epoch was saved\)"),
], ids=["nan-loss", "overflow"])
@pytest.mark.slow  # trains
def test_divergence_stops_the_run_as_failed_and_saves_nothing(tmp_path, tiny_tokens, new_store, lr, tracked,
                                                              message):
    write_params(tmp_path, tiny_params(train={"lr": lr, "optimizer": "sgd", "lr_schedule": "constant"},
                                       tracking={"enabled": tracked}))
    env = {**stage_env(), "MLFLOW_TRACKING_URI": new_store(tmp_path)}
    line = one_error(in_process("train", *train_args(tmp_path, tiny_tokens), cwd=tmp_path, env=env))
    assert re.fullmatch(message, line), line
    if tracked:
        assert [run.info.status for run in mlflow_runs(tmp_path / "mlflow.db")] == ["FAILED"]
    assert not list(tmp_path.rglob("*.pt")) and not (tmp_path / "models").exists()


def test_weights_gone_nan_at_an_epochs_end_are_not_saved(monkeypatch):
    """NaN weights after an epoch's last step show only in its validation perplexity: the epoch
    is refused before it is yielded, so the stage saves nothing of it."""
    import torch

    import rnnlab.training.loop as training
    from rnnlab.models.lm import ModelConfig, build_model

    monkeypatch.setattr(training, "perplexity", lambda *a, **k: math.nan)
    cfg = shipped(Train, lr=0.01, num_steps=4, batch_size=2, epochs=3, device="cpu", threads=1)
    model = build_model(ModelConfig(vocab_size=5, cell="rnn", impl="torch", hidden_size=4))
    state = training.new_state(model, cfg)
    ids = torch.arange(100) % 5
    with pytest.raises(UserError, match=r"diverged: after epoch 1 .* validation perplexity nan; lower train.lr"):
        next(training.run_epochs(state, ids, ids, cfg, torch.device("cpu")))
    assert state.epoch == 0 and state.history == []


def read_curves(path: Path) -> list[tuple]:
    """The epoch and perplexity columns of a curves CSV (timings differ from run to run)."""
    lines = path.read_text().splitlines()
    head = lines[0].split(",")
    cols = [head.index(c) for c in ("epoch", "train_ppl", "val_ppl")]
    return [tuple(line.split(",")[i] for i in cols) for line in lines[1:]]


def read_result(model: Path, curves: Path) -> dict:
    """What must not depend on an interruption: train.json's numbers, the curves, the weights."""
    summary = json.loads((model / "train.json").read_text())
    weights = torch.load(model / "best.pt", weights_only=True)["state_dict"]
    return {"summary": {k: summary[k] for k in ("best_epoch", "best_val_ppl", "final_train_ppl", "epochs")},
            "curves": read_curves(curves), "weights": weights}


def same_result(a: dict, b: dict) -> None:
    assert a["summary"] == b["summary"]
    assert a["curves"] == b["curves"]
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


def kill_after_epoch(cmd: list, cwd: Path, env: dict, epoch: int = 2) -> str:
    """Start `cmd`, SIGKILL it as soon as it prints the line of `epoch`; return what it printed."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if re.match(rf"epoch +{epoch}/", line):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.stdout.close()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(out)
    return "".join(out)


@pytest.mark.slow  # trains
def test_killed_training_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_tokens):
    epochs = 8
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    write_params(tmp_path / "ref", tiny_params(train={"epochs": epochs}))
    in_process("train", *train_args(tmp_path / "ref", tiny_tokens), cwd=tmp_path / "ref", check=True)

    run = tmp_path / "run"
    write_params(run, tiny_params(train={"epochs": epochs}, tracking={"enabled": True}))
    # the same code in every process, the killed one too: the in-process runs' (conftest.py)
    env = {**stage_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{run}/mlflow.db", **REFERENCE}
    cmd = [sys.executable, "-m", "stages.train", *map(str, train_args(run, tiny_tokens))]
    first = kill_after_epoch(cmd, run, env, epoch=2)
    run_id = re.search(r"MLflow run (\w+) \(new\)", first).group(1)
    assert (run / "checkpoints/rnn/resume.pt").is_file() and not (run / "models/rnn/best.pt").exists()

    again = in_process("train", *train_args(run, tiny_tokens), cwd=run, env=env, check=True)
    done = int(re.search(r"rnn: resuming after epoch (\d+) of 8 from \S+resume.pt", again.stdout).group(1))
    assert 2 <= done < epochs
    assert f"MLflow run {run_id} (reopened)" in again.stdout
    assert f"epoch {done + 1:>3}/{epochs}" in again.stdout and f"epoch {done:>3}/" not in again.stdout
    same_result(read_result(run / "models/rnn", run / "curves/rnn.csv"),
                read_result(tmp_path / "ref/models/rnn", tmp_path / "ref/curves/rnn.csv"))
    assert json.loads((run / "models/rnn/train.json").read_text())["mlflow_run_id"] == run_id
    (mlflow_run,) = mlflow_runs(run / "mlflow.db")
    assert (mlflow_run.info.run_id, mlflow_run.info.status) == (run_id, "FINISHED")
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{run / 'mlflow.db'}").get_metric_history(run_id, "val_ppl")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # each epoch once
    assert not (run / "checkpoints/rnn").exists()  # finished: nothing left to resume


@pytest.mark.slow  # trains
def test_a_resume_file_from_other_settings_is_not_used(tmp_path, tiny_tokens):
    write_params(tmp_path, tiny_params(train={"epochs": 2}))
    work = tmp_path / "checkpoints" / "rnn"
    save_resume(work / "resume.pt", {"epoch": 1}, fingerprint="other settings")
    out = in_process("train", *train_args(tmp_path, tiny_tokens), cwd=tmp_path, check=True).stdout
    assert "rnn: starting over, not resuming: the resumable state was saved by an older version" in out
    assert "resuming after" not in out and "epoch   1/2" in out


@pytest.mark.slow  # trains
def test_a_run_killed_under_other_code_starts_over_saying_which_file(tmp_path, tiny_tokens):
    """Killed after epoch 2; then the train stage's code changes (here: the fingerprint the state
    was saved with names another rnnlab/training/loop.py). The next run trains from epoch 1."""
    write_params(tmp_path, tiny_params(train={"epochs": 6}))
    cmd = [sys.executable, "-m", "stages.train", *map(str, train_args(tmp_path, tiny_tokens))]
    kill_after_epoch(cmd, tmp_path, stage_env(), epoch=2)
    path = tmp_path / "checkpoints" / "rnn" / "resume.pt"
    state = torch.load(path, weights_only=True)
    assert "rnnlab/training/loop.py" in state["fingerprint"]["code"]
    state["fingerprint"]["code"]["rnnlab/training/loop.py"] = "0" * 40  # made by other code
    save_resume(path, {k: v for k, v in state.items() if k not in ("format", "fingerprint")},
                state["fingerprint"])
    out = in_process("train", *train_args(tmp_path, tiny_tokens), cwd=tmp_path, check=True).stdout
    assert (f"rnn: starting over, not resuming: the code (rnnlab/training/loop.py) changed since {path} "
            "was saved") in out
    assert "resuming after" not in out and "epoch   1/6" in out


@pytest.mark.slow  # trains
def test_a_run_resumed_on_another_kernel_path_continues_saying_so(tmp_path, tiny_tokens):
    """Killed after epoch 2 on the fused path; resumed where the reference path is what runs (as on
    another CPU whose measurement picked it). It goes on, names the change, and finishes."""
    write_params(tmp_path, tiny_params(train={"epochs": 4}, tracking={"enabled": True}))
    env = {**stage_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    cmd = [sys.executable, "-m", "stages.train", *map(str, train_args(tmp_path, tiny_tokens))]
    kill_after_epoch(cmd, tmp_path, {**env, "RNNLAB_KERNEL": "fused"}, epoch=2)
    saved = torch.load(tmp_path / "checkpoints/rnn/resume.pt", weights_only=True)["kernels"]
    assert set(saved["paths"].values()) >= {"fused"}, saved  # the path of the epochs so far
    again = in_process("train", *train_args(tmp_path, tiny_tokens), cwd=tmp_path,
                       env={**env, **REFERENCE}, check=True).stdout
    done = int(re.search(r"rnn: resuming after epoch (\d+) of 4", again).group(1))
    line = re.search(rf"rnn: the kernel path changed after epoch {done} \((.+)\); continuing", again)
    assert line and ": fused -> reference" in line.group(1), again
    assert "epoch   4/4" in again
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert "fused -> reference" in run.data.tags["rnnlab.kernels_changed"]


@pytest.mark.slow  # trains
@pytest.mark.parametrize("damage", [b"", b"garbage"])
def test_a_damaged_resume_file_starts_over(tmp_path, tiny_tokens, damage):
    write_params(tmp_path, tiny_params(train={"epochs": 2}))
    (tmp_path / "checkpoints" / "rnn").mkdir(parents=True)
    (tmp_path / "checkpoints" / "rnn" / "resume.pt").write_bytes(damage)
    out = in_process("train", *train_args(tmp_path, tiny_tokens), cwd=tmp_path, check=True).stdout
    assert "rnn: starting over, not resuming: " in out and "not a readable checkpoint" in out
    assert "resuming after" not in out and "epoch   2/2" in out


@pytest.mark.slow
def test_dvc_repro_after_a_killed_train_stage_resumes(pipeline, tmp_path):
    """The real thing: `dvc repro train@rnn` in a copy of the session's pipeline, with a variant
    that trains long enough to be killed; SIGKILL the stage mid-run; `dvc repro` again."""
    from tests.repos import edit_params

    def edit(params):
        params["data"]["max_tokens"] = 4000
        params["train"].update(epochs=8, hidden_size=12)
        params["variants"] = {"rnn": {"cell": "rnn"}}

    repo = pipeline.copy(tmp_path / "repo")
    edit_params(repo, edit, "a variant to kill")
    env = {**stage_env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db", **REFERENCE}  # as the reference run
    env.pop("PYTHONPATH")
    dvc = str(BIN / "dvc")
    subprocess.run([dvc, "repro", "tokenize"], cwd=repo, env=env, check=True, capture_output=True)

    proc = subprocess.Popen([dvc, "repro", "train@rnn"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if re.match(r"epoch +2/8", line):
            import psutil

            (train,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
                        if "-m" in p.cmdline() and "stages.train" in p.cmdline()]  # not `sh -c`
            train.send_signal(signal.SIGKILL)
            break
    printed.append(proc.stdout.read())
    assert proc.wait(timeout=120) != 0, "".join(printed)
    assert not (repo / "models" / "rnn" / "best.pt").exists()

    again = subprocess.run([dvc, "repro", "train@rnn"], cwd=repo, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"rnn: resuming after epoch [2-7] of 8", again.stdout), again.stdout
    assert "up to date" in subprocess.run([dvc, "status", "train@rnn"], cwd=repo, env=env,
                                          capture_output=True, text=True).stdout

    # an uninterrupted run of the same stage, by hand, into other paths
    ref = tmp_path / "ref"
    ref.mkdir()
    in_process("train", "--variant", "rnn", "--data", "data/tokens", "--out", ref / "models/rnn",
          "--curves", ref / "curves/rnn.csv", "--work", ref / "checkpoints/rnn", cwd=repo, check=True,
          env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{ref}/mlflow.db"})
    same_result(read_result(repo / "models/rnn", repo / "metrics/curves/rnn.csv"),
                read_result(ref / "models/rnn", ref / "curves/rnn.csv"))
    (run,) = [r for r in mlflow_runs(repo / "mlflow.db") if r.data.tags["rnnlab.variant"] == "rnn"]
    assert run.info.status == "FINISHED"


# =============================================================================================
# Faults around training: full disk, read-only folder, damaged checkpoints, odd text


class _FullDisk:
    """A file on a full disk: the first write gets one byte out, then fails with ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(bytes(data)[:1] if not isinstance(data, str) else data[:1])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk(monkeypatch, folder: Path) -> None:
    """Every file opened for writing under `folder` hits a full disk."""
    real_open = io.open

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and \
                Path(os.path.abspath(file)).is_relative_to(folder):
            return _FullDisk(f)
        return f

    monkeypatch.setattr(io, "open", full_open)
    monkeypatch.setattr("builtins.open", full_open)


def _tiny_model():
    vocab = build_vocab(list("the time machine"))
    return build_model(ModelConfig(vocab_size=len(vocab), cell="lstm", impl="torch", hidden_size=4)), vocab


def _report_png(path: Path) -> None:
    from stages.report import plot_val

    plot_val({"rnn": [{"epoch": 1.0, "val_ppl": 9.0}, {"epoch": 2.0, "val_ppl": 8.0}]}, path)


def _tokens(path: Path) -> None:
    params = validate_params(TINY)
    save_tokens(tokenize_corpus("the time machine " * 40, params.data, params.tokenize), path.parent)


WRITERS = {  # what writes it -> (file name, how)
    "metrics JSON": ("m.json", lambda p: write_json(p, {"test_ppl": 5.0})),
    "samples Markdown": ("s.md", lambda p: write_text(p, "# Samples\n")),
    "curves CSV": ("c.csv", lambda p: record_curves(p, [dict.fromkeys(
        ("epoch", "train_ppl", "val_ppl", "tokens_per_sec", "grad_norm", "clipped_frac", "lr",
         "seconds"), 1.0)], Tracker(None))),
    "checkpoint best.pt": ("best.pt", lambda p: save_checkpoint(p, *_tiny_model())),
    "resume.pt": ("resume.pt", lambda p: save_resume(p, {"epoch": 1, "x": torch.zeros(100)}, "f")),
    "report PNG": ("val_ppl.png", _report_png),
    "token ids .npy": ("train.npy", _tokens),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_full_disk_is_one_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch, writer):
    name, write = WRITERS[writer]
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"old")
    fill_disk(monkeypatch, out)
    with pytest.raises(UserError) as err:
        write(out / name)
    assert re.fullmatch(rf"cannot write {re.escape(str(out))}/\S+: No space left on device; nothing was "
                        r"written there \(free some disk space or make the folder writable, then run "
                        r"again\)", str(err.value))
    assert (out / name).read_bytes() == b"old"
    assert not no_temp_files(out)


def test_full_disk_during_download_leaves_nothing(tmp_path, monkeypatch):
    fill_disk(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="No space left on device; nothing was written"):
        prepare_raw(shipped(Data, corpus="timemachine"), tmp_path / "raw")
    assert list(tmp_path.iterdir()) == []


def make_read_only(monkeypatch, folder: Path, err: int) -> None:
    """chmod a-w; root ignores that, so then refuse creating files in `folder` as the OS would."""
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.touch()
    except OSError:
        return  # the permission bits hold: nothing to simulate
    probe.unlink()
    real = os.open

    def refuse(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(os.path.abspath(path)).parent == folder:
            raise OSError(err, os.strerror(err), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)


@pytest.mark.slow  # trains
@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS], ids=["EACCES", "EROFS"])
def test_read_only_output_folder_is_one_clear_error(tmp_path, monkeypatch, capsys, tiny_trained, tiny_tokens, err):
    import stages.evaluate

    out = tmp_path / "metrics"
    out.mkdir()
    make_read_only(monkeypatch, out, err)
    monkeypatch.setattr(sys, "argv", ["evaluate", *map(str, eval_args(tiny_trained, tiny_tokens, tiny_trained / "models/rnn",
                                                                      out=tmp_path))])
    with pytest.raises(SystemExit) as exit_:
        run_main(stages.evaluate.main)
    out.chmod(0o755)
    assert exit_.value.code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert line == (f"error: cannot write {out}/rnn.json: {os.strerror(err)}; nothing was written there "
                    "(free some disk space or make the folder writable, then run again)")
    assert list(out.iterdir()) == []


@pytest.mark.slow  # trains
def test_full_disk_while_saving_resume_state_keeps_the_last_one(tmp_path, monkeypatch, capsys, tiny_tokens):
    """Disk full at the end of epoch 2: a clear error; the run resumes later from epoch 1."""
    import rnnlab.training.resume
    import stages.train

    write_params(tmp_path, tiny_params(train={"epochs": 3}))
    work = tmp_path / "checkpoints" / "rnn"
    real_save = rnnlab.training.resume.save_resume
    calls = []

    def save_then_fill(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            fill_disk(monkeypatch, work)
        real_save(path, *args, **kwargs)

    monkeypatch.setattr(rnnlab.training.resume, "save_resume", save_then_fill)
    monkeypatch.setattr(sys, "argv", ["train", *map(str, train_args(tmp_path, tiny_tokens))])
    with pytest.raises(SystemExit):
        run_main(stages.train.main)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"error: cannot write {work}/resume.pt: No space left on device; nothing was written" in err
    assert torch.load(work / "resume.pt", weights_only=True)["epoch"] == 1
    assert not no_temp_files(tmp_path)
    again = in_process("train", *train_args(tmp_path, tiny_tokens), cwd=tmp_path, check=True).stdout
    assert "rnn: resuming after epoch 1 of 3" in again


def test_unreadable_split_file_of_a_custom_corpus(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split in ("train", "val", "test"):
        (folder / f"{split}.txt").write_text("some text\n")
    (folder / "val.txt").chmod(0)
    real = Path.read_bytes

    def read_bytes(self):  # root reads mode-0 files: refuse as the OS would for anyone else
        if self.name == "val.txt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(UserError) as err:
        prepare_raw(shipped(Data, corpus="custom", source=str(folder)), tmp_path / "raw")
    assert str(err.value) == (f"{folder / 'val.txt'}: cannot read it: Permission denied (check "
                              "data.source and the file's permissions)")
    assert not (tmp_path / "raw").exists()


def _checkpoint_payload(folder: Path, variant: str = "rnn") -> dict:
    return torch.load(folder / "models" / variant / "best.pt", weights_only=True)


def _damage(kind: str, tiny_trained: Path, path: Path) -> None:
    good = (tiny_trained / "models/rnn/best.pt").read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "not a checkpoint":
        path.write_bytes(b"this is not a checkpoint\n")
    elif kind == "damaged inside":  # a zip as torch.save writes, its pickle overwritten
        with zipfile.ZipFile(tiny_trained / "models/rnn/best.pt") as src, zipfile.ZipFile(path, "w") as dst:
            for name in src.namelist():
                dst.writestr(name, b"garbage" if name.endswith("data.pkl") else src.read(name))
    elif kind == "another variant":
        shutil.copy(tiny_trained / "models/lstm/best.pt", path)
    elif kind == "other vocabulary":  # as if trained on other text
        payload = _checkpoint_payload(tiny_trained)
        payload["vocab"] = {**payload["vocab"], "tokens": payload["vocab"]["tokens"][:-1],
                            "freqs": payload["vocab"]["freqs"][:-1]}
        torch.save(payload, path)
    elif kind == "wrong shapes":
        payload = _checkpoint_payload(tiny_trained)
        payload["state_dict"] = {k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in payload["state_dict"].items()}
        torch.save(payload, path)
    elif kind == "no weights":
        payload = _checkpoint_payload(tiny_trained)
        del payload["state_dict"]
        torch.save(payload, path)


DAMAGE = {
    "truncated": r"error: \S+/best.pt: not a readable checkpoint \(truncated or corrupt\?\): not the zip "
                 r"archive torch.save writes",
    "not a checkpoint": r"error: \S+/best.pt: not a readable checkpoint \(truncated or corrupt\?\): not the "
                        r"zip archive torch.save writes",
    "damaged inside": r"error: \S+/best.pt: not a readable checkpoint \(truncated or corrupt\?\): its "
                      r"contents are damaged or not plain tensors, numbers and strings",
    "another variant": r"error: \S+/best.pt: holds variant 'lstm' \(lstm/torch 1x12, embed 0, dropout 0, "
                       r"vocabulary \d+\), but params.yaml's variant 'rnn' is rnn/torch 1x12, embed 0, "
                       r"dropout 0, vocabulary \d+; train it again \(dvc repro train@rnn\)",
    "other vocabulary": r"error: \S+/best.pt: the checkpoint was trained on another vocabulary \(\d+ "
                        r"tokens\) than the data given \(\d+ tokens\); retrain it on this data",
    "wrong shapes": r"error: \S+/best.pt: the weights do not fit the model config stored with them "
                    r"\(from another variant or a damaged file\?\): size mismatch for .+",
    "no weights": r"error: \S+/best.pt: the checkpoint's model config, vocabulary or weights are "
                  r"unreadable \(KeyError: 'state_dict'\)",
}


@pytest.mark.slow  # trains
@pytest.mark.parametrize("kind", DAMAGE)
def test_evaluate_rejects_a_damaged_or_foreign_checkpoint(tmp_path, tiny_trained, tiny_tokens, kind):
    model = tmp_path / "models" / "rnn"
    model.mkdir(parents=True)
    shutil.copy(tiny_trained / "models/rnn/train.json", model)
    _damage(kind, tiny_trained, model / "best.pt")
    shutil.copy(tiny_trained / "params.yaml", tmp_path)
    line = one_error(in_process("evaluate", *eval_args(tmp_path, tiny_tokens, model), cwd=tmp_path))
    assert re.fullmatch(DAMAGE[kind], line), line
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "samples").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_checkpoint_bytes_give_a_user_error(tmp_path, data):
    """Random bytes, or a real checkpoint with bytes flipped or cut: a UserError or a model, never
    another exception."""
    model, vocab = _tiny_model()
    good = tmp_path / "good.pt"
    if not good.exists():
        save_checkpoint(good, model, vocab)
    raw = bytearray(good.read_bytes())
    how = data.draw(st.sampled_from(["random", "flip", "cut"]))
    if how == "random":
        raw = bytearray(data.draw(st.binary(max_size=200)))
    elif how == "flip":
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[i] ^= 0xFF
    else:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    (tmp_path / "bad.pt").write_bytes(bytes(raw))
    try:
        load_checkpoint(tmp_path / "bad.pt", vocab)
    except UserError as err:
        assert "\n" not in str(err)


@pytest.mark.slow  # trains
def test_evaluate_without_train_json_or_tokens_is_one_line(tmp_path, tiny_trained, tiny_tokens):
    model = tmp_path / "models" / "rnn"
    model.mkdir(parents=True)
    shutil.copy(tiny_trained / "models/rnn/best.pt", model)
    shutil.copy(tiny_trained / "params.yaml", tmp_path)
    line = one_error(in_process("evaluate", *eval_args(tmp_path, tiny_tokens, model), cwd=tmp_path))
    assert line == f"error: {model}/train.json: not found; run train@rnn first"
    tokens = tmp_path / "tokens"
    shutil.copytree(tiny_tokens, tokens)
    (tokens / "val.npy").unlink()
    with pytest.raises(UserError, match=r"val.npy: unreadable token data \(FileNotFoundError"):
        load_tokens(tokens)


def test_text_unseen_in_training_is_counted_as_unk(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("the time machine " * 20)
    (corpus / "val.txt").write_text("the Time Machine!")     # T, M, ! never seen in training
    (corpus / "test.txt").write_text("über the time")         # ü, b, r never seen in training
    write_params(tmp_path, tiny_params(data={"corpus": "custom", "source": str(corpus), "max_tokens": None},
                                       tokenize={"normalize": "plain"}))
    in_process("download", "--params", tmp_path / "params.yaml", "--out", tmp_path / "raw", cwd=tmp_path,
               check=True)
    out = in_process("tokenize", "--params", tmp_path / "params.yaml", "--raw", tmp_path / "raw", "--out",
                tmp_path / "tokens", cwd=tmp_path, check=True).stdout
    assert "<unk> in val 3, test 3" in out
    tokens = load_tokens(tmp_path / "tokens")
    assert int((tokens.splits["val"] == 0).sum()) == 3 and tokens.vocab.tokens[0] == "<unk>"


@pytest.mark.slow  # trains
def test_long_and_unknown_prefixes_are_handled(tmp_path, tiny_trained, tiny_tokens):
    """A prefix longer than the training text warms the model up on all of it; a prefix is
    normalised as the corpus was (book: lower case, non-letters to a space), and characters the
    vocabulary still lacks are read as <unk> with a warning ('q' is not in the tiny corpus)."""
    long = ("the time traveller " * 300)[:5000]  # longer than the 4,000 training tokens
    params = tiny_params(evaluate={"prefixes": [long, "Quick, Time Traveller!"], "num_tokens": 5})
    write_params(tmp_path, params)
    proc = in_process("evaluate", *eval_args(tmp_path, tiny_tokens, tiny_trained / "models/rnn"), cwd=tmp_path,
                      check=True)
    assert "Traceback" not in proc.stderr
    assert "warning: prefix 'Quick, Time Traveller!': 'q' not in the vocabulary, read as <unk>" in proc.stderr
    samples = (tmp_path / "samples/rnn.md").read_text()
    assert f"- greedy: `{long}" in samples and "- greedy: `quick time traveller" in samples
