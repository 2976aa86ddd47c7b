"""params.yaml validation: every mistake is one readable line naming the key, value and rule."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from rnnlab.config import (
    Data,
    Evaluate,
    Params,
    Split,
    Tokenize,
    Tracking,
    Train,
    TrainOverrides,
    Variant,
    deep_merge,
    flatten,
    load_params,
    resolve_train,
    validate_params,
)
from rnnlab.errors import UserError
from tests.conftest import shipped_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert {"rnn_scratch", "rnn", "gru", "lstm", "lstm2"} <= set(params.variants)
    assert params.variants["lstm2"].num_layers == 2


def test_every_train_key_has_a_comment_in_params_yaml():
    lines = (ROOT / "params.yaml").read_text().splitlines()
    for key in Params.model_fields["train"].annotation.model_fields:
        line = next((ln for ln in lines if ln.strip().startswith(f"{key}:")), None)
        assert line is not None and "#" in line, f"train.{key} has no comment in params.yaml"


@pytest.mark.parametrize("mutate, expected", [
    (lambda p: p["train"].update(clip_thta=1), "train.clip_thta: unknown key; allowed: lr, clip_theta"),
    (lambda p: p["train"].update(lr=0), "train.lr = 0: Input should be greater than 0"),
    (lambda p: p["train"].update(lr=float("nan")), "train.lr = nan"),
    (lambda p: p["train"].update(num_steps=0), "train.num_steps = 0: Input should be greater than or equal to 1"),
    (lambda p: p["train"].update(hidden_size="256"), "train.hidden_size = '256': Input should be a valid integer"),
    (lambda p: p["train"].update(optimizer="rmsprop"), "train.optimizer = 'rmsprop': Input should be 'sgd' or 'adam'"),
    (lambda p: p["evaluate"].update(temperature=0), "evaluate.temperature = 0"),
    (lambda p: p["evaluate"].update(prefixes=[""]), "evaluate.prefixes.0 = ''"),
    (lambda p: p["tokenize"].update(split={"train": 0.5, "val": 0.2, "test": 0.2}), "must be 1, got 0.9"),
    (lambda p: p["tokenize"].update(token="byte"), "tokenize.token = 'byte': Input should be 'char' or 'word'"),
    (lambda p: p["data"].update(corpus="nope"), "data.corpus = 'nope': unknown corpus; allowed: timemachine, jaychou_lyrics, ptb, custom"),
    (lambda p: p["data"].update(corpus="custom"), "corpus 'custom' needs data.source"),
    (lambda p: p["variants"]["rnn"].update(cell="cnn"), "variants.rnn.cell = 'cnn': Input should be 'rnn', 'gru' or 'lstm'"),
    (lambda p: p["variants"]["rnn"].update(impl="cudnn"), "variants.rnn.impl = 'cudnn': Input should be 'scratch' or 'torch'"),
    (lambda p: p["variants"]["rnn"].update(bidirectional=True), "cannot be a next-token language model"),
    (lambda p: p["variants"]["rnn"].update(train={"lrr": 1}),
     "variants.rnn.train.lrr: unknown key; allowed: lr, clip_theta"),
    (lambda p: p["variants"]["rnn"].update(train={"lr": -1}), "variants.rnn.train.lr = -1: Input should be greater than 0"),
    (lambda p: p.update(variants={}), "variants"),
    (lambda p: p.update(trian={}), "trian: unknown key; allowed: data, tokenize, train, variants"),
])
def test_bad_values_are_named(params_dict, mutate, expected):
    p = copy.deepcopy(params_dict)
    mutate(p)
    with pytest.raises(UserError) as err:
        validate_params(p)
    assert expected in str(err.value)


def test_variant_overrides_apply(params_dict):
    params_dict["variants"]["rnn"].update(hidden_size=32, train={"lr": 0.5, "epochs": 3})
    params = validate_params(params_dict)
    cfg = resolve_train(params, "rnn")
    assert (cfg.lr, cfg.epochs, cfg.hidden_size) == (0.5, 3, 32)
    assert resolve_train(params, "lstm_scratch").lr == 0.01


def test_yaml_syntax_error_names_the_line(tmp_path):
    (tmp_path / "p.yaml").write_text("train:\n  lr: [1\n")
    with pytest.raises(UserError, match=r"not valid YAML.*line"):
        load_params(tmp_path / "p.yaml")


def test_overlay_merges_nested_keys():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    assert flatten({"train": {"lr": 1}, "x": 2}) == {"train.lr": 1, "x": 2}


def test_cli_prints_one_error_without_traceback(tmp_path, params_dict):
    params_dict["train"]["clip_thta"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict))
    proc = subprocess.run([sys.executable, "-m", "rnnlab.config", str(tmp_path / "params.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "train.clip_thta: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_absurd_learning_rate_is_rejected(params_dict):
    params_dict["train"]["lr"] = 1e38
    with pytest.raises(UserError, match=r"train.lr = 1e\+38: Input should be less than or equal to 1000000"):
        validate_params(params_dict)


# --- params.yaml is the one source of defaults ---------------------------------------------------

SECTIONS = [Data, Split, Tokenize, Train, Evaluate, Tracking, Params]


@pytest.mark.parametrize("model", SECTIONS, ids=lambda m: m.__name__)
def test_the_schema_has_no_defaults_for_what_params_yaml_holds(model):
    """Defaults are written once, in params.yaml; only a variant's optional keys have them here."""
    assert [name for name, f in model.model_fields.items() if not f.is_required()] == []


@pytest.mark.parametrize("key", [k for k in flatten(shipped_params()) if not k.startswith("variants.")])
def test_a_deleted_key_is_one_line_naming_it(key):
    raw = shipped_params()
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[last]
    with pytest.raises(UserError) as err:
        validate_params(raw)
    assert str(err.value) == f"params.yaml: {key}: missing (required)"


@pytest.mark.parametrize("section", ["data", "tokenize", "train", "variants", "evaluate", "tracking"])
def test_a_deleted_section_is_one_line_naming_it(section):
    raw = shipped_params()
    del raw[section]
    with pytest.raises(UserError) as err:
        validate_params(raw)
    assert str(err.value) == f"params.yaml: {section}: missing (required)"


def test_cli_names_a_deleted_key_without_traceback(tmp_path):
    raw = shipped_params()
    del raw["train"]["lr"]  # no silent fallback to another learning rate
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "rnnlab.config", str(tmp_path / "params.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'params.yaml'}: train.lr: missing (required)\n"


@pytest.mark.parametrize("threads", ["auto", 0, 3])
def test_threads_accepts_auto_or_a_count(threads):
    raw = shipped_params({"train": {"threads": threads},
                          "variants": {"rnn": {"cell": "rnn", "train": {"threads": threads}}}})
    params = validate_params(raw)
    assert params.train.threads == threads and resolve_train(params, "rnn").threads == threads


@pytest.mark.parametrize("threads", [-1, "two", 1.5, True, None, "Auto"])
@pytest.mark.parametrize("where", ["train", "variants.rnn.train"])
def test_threads_rejects_anything_else_in_one_line(threads, where):
    raw = shipped_params({"variants": {"rnn": {"cell": "rnn"}}})
    section = raw["train"] if where == "train" else raw["variants"]["rnn"].setdefault("train", {})
    section["threads"] = threads
    with pytest.raises(UserError) as err:
        validate_params(raw)
    assert str(err.value) == (f"params.yaml: {where}.threads = {threads!r}: Input should be 'auto' "
                              "or an integer >= 0 (0 = PyTorch's default)")


def test_shipped_threads_is_auto():
    assert load_params(ROOT / "params.yaml").train.threads == "auto"


# --- a variant's train overrides: Train's keys, all optional ------------------------------------


@pytest.mark.parametrize("key", list(Train.model_fields))
def test_overrides_have_trains_types_and_ranges(key):
    train, over = Train.model_fields[key], TrainOverrides.model_fields[key]
    assert (over.annotation, over.metadata) == (train.annotation, train.metadata)
    assert not over.is_required() and over.default is None


def test_overrides_accept_a_subset_and_apply_only_it():
    over = TrainOverrides(lr=0.5, epochs=3)
    assert over.model_fields_set == {"lr", "epochs"}
    assert Variant(cell="rnn", train=over).overrides() == {"lr": 0.5, "epochs": 3}
    assert Variant(cell="rnn").overrides() == {}


def test_overrides_reject_unknown_keys_and_hidden_size():
    with pytest.raises(ValidationError, match="lrr"):
        TrainOverrides(lrr=1)
    with pytest.raises(ValidationError, match="set the variant's own hidden_size"):
        TrainOverrides(hidden_size=8)


@pytest.mark.parametrize("key, value", [
    ("lr", 0), ("lr", 1e7), ("clip_theta", 0), ("num_steps", 0), ("batch_size", 0), ("epochs", 0),
    ("optimizer", "rmsprop"), ("sampling", "shuffled"), ("seed", -1), ("device", "tpu"),
    ("dropout", 1.0), ("lr_schedule", "linear"), ("weight_decay", -0.1), ("init_scale", 0),
    ("lr_decay", 0.5), ("bf16", "yes"),
    ("threads", -1), ("epochs", 2.0),
])
def test_a_bad_value_is_refused_alike_in_train_and_in_an_override(key, value):
    def error(overlay: dict, where: str) -> str:
        with pytest.raises(UserError) as err:
            validate_params(shipped_params(overlay))
        return str(err.value).removeprefix(f"params.yaml: {where}.")

    in_train = error({"train": {key: value}}, "train")
    in_variant = error({"variants": {"rnn": {"cell": "rnn", "train": {key: value}}}},
                       "variants.rnn.train")
    assert in_train == in_variant and in_train.startswith(f"{key} = {value!r}: ")


@pytest.mark.parametrize("train", [
    {"lr_schedule": "stepp", "lr_decay": 0.5, "lr_decay_after": 3},  # the typo is the one error
    {"epochs": 1, "lr_schedule": "step", "lr_decay": 0.5, "lr_decay_after": 1},
    {"lr_decay": 2},
])
def test_a_schedule_mistake_is_one_line(train):
    with pytest.raises(UserError) as err:
        validate_params(shipped_params({"train": train}))
    assert len(str(err.value).splitlines()) == 1, str(err.value)


@pytest.mark.parametrize("value, ok", [("rnnlab-char", True), ("lm.v2_x", True), (None, True),
                                       ("bad name", False), ("-x", False), ("", False)])
def test_tracking_register_is_a_registered_model_name_or_null(value, ok):
    raw = shipped_params({"tracking": {"register": value}})
    if ok:
        assert validate_params(raw).tracking.registry == value
    else:
        with pytest.raises(UserError, match=r"^.*tracking\.register = .*: a registered model name"):
            validate_params(raw)
