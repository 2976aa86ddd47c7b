"""Presets: each validates, and its `dvc exp run -S` overrides give exactly the merged params."""

import os
import shutil
import sys
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from rnnlab.cli.presets import (
    PRESETS,
    available,
    hydra_value,
    load_preset,
    merged,
    overrides,
)
from rnnlab.config import read_yaml, validate_params
from rnnlab.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
NAMES = available(ROOT / PRESETS)


def test_the_book_presets_ship():
    assert {"book-rnn-concise", "book-rnn-scratch", "book-rnn-scratch-random", "book-gru", "book-lstm",
            "book-deep-lstm", "jaychou-scratch", "jaychou-concise"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_preset_validates_against_the_schema(name):
    overlay = load_preset(name, ROOT / PRESETS)
    params = validate_params(merged(read_yaml(ROOT / "params.yaml"), overlay), name)
    assert set(params.variants) == set(overlay["variants"])


@pytest.mark.parametrize("name", NAMES)
def test_overrides_reproduce_the_merged_params(name, tmp_path):
    overlay = load_preset(name, ROOT / PRESETS)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", overrides(overlay))  # what `dvc exp run -S` does
    assert read_yaml(tmp_path / "params.yaml") == merged(read_yaml(ROOT / "params.yaml"), overlay)


def test_a_value_becomes_the_text_of_its_hydra_override():
    assert hydra_value("sgd") == "sgd"
    assert hydra_value("time traveller") == "'time traveller'"
    assert hydra_value("null") == "'null'" and hydra_value(None) == "null"
    assert hydra_value({"a": [1, 2.5, True], "b": "it's"}) == "{a:[1,2.5,true],b:'it\\'s'}"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError, match="available: book-deep-lstm"):
        load_preset("nope", ROOT / PRESETS)


@pytest.mark.slow
def test_presets_run_as_named_experiments(tmp_path):
    """A Time Machine preset and a lyrics preset, 2 epochs each, through `dvc exp run --temp`."""
    from tests.repos import copy_repo, run

    repo = copy_repo(tmp_path / "repo")
    lyrics = tmp_path / "lyrics.txt"  # a stand-in for the real (not redistributable) corpus
    lyrics.write_text("想要有直升机 想要和你飞到宇宙去\n" * 300 + "分开 不分开 我不能再想\n" * 100, encoding="utf-8")
    tiny = ["-S", "train.epochs=2", "-S", "evaluate.num_tokens=5"]
    before = (repo / "params.yaml").read_text()
    run([sys.executable, "-m", "rnnlab.cli.presets", "book-rnn-concise", *tiny], repo)
    run([sys.executable, "-m", "rnnlab.cli.presets", "jaychou-concise", *tiny, "-S", "data.corpus=custom",
         "-S", f"data.source={lyrics}"], repo)
    assert (repo / "params.yaml").read_text() == before  # the user's params are untouched
    show = run([str(Path(sys.executable).parent / "dvc"), "exp", "show", "--csv"], repo)
    assert "book-rnn-concise" in show and "jaychou-concise" in show
    assert "metrics/variants/jaychou_concise.json:test_ppl" in show


@pytest.mark.slow
def test_the_word_level_preset_runs_end_to_end(tmp_path):
    """zaremba-small's settings (word tokens, <eos>, SGD with the step schedule, init_scale)
    through `dvc exp run --temp`, on a tiny PTB-shaped corpus with its own splits (a custom
    corpus: the built-in ptb is checked against the real file's sha1), at 2 epochs and 8 units."""
    from tests.repos import copy_repo, run

    repo = copy_repo(tmp_path / "repo")
    corpus = tmp_path / "ptb"
    corpus.mkdir()
    words = "the company said N <unk> shares rose in the first quarter of the year".split()
    for name, lines in (("train", 400), ("valid", 40), ("test", 40)):
        text = "".join(" " + " ".join(words[(i % 7):] + words[:(i % 7)]) + " \n" for i in range(lines))
        (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    out = run([sys.executable, "-m", "rnnlab.cli.presets", "zaremba-small", "-S", "data.corpus=custom",
               "-S", f"data.source={corpus}", "-S", "data.max_tokens=null",
               "-S", "train.epochs=2", "-S", "train.lr_decay_after=1",
               "-S", "variants.zaremba_small.hidden_size=8", "-S", "variants.zaremba_small.embed_size=8",
               "-S", "evaluate.num_tokens=5"], repo)
    per_line = len(words) + 1  # and its <eos>
    vocab = len(set(words) - {"<unk>"}) + 2  # the words, <unk> and <eos>
    assert f"train {400 * per_line:,} tokens | val {40 * per_line} | test {40 * per_line} | vocab {vocab}" in out
    assert "lr 20 " in out and "lr 10 " in out  # epoch 1 at the full rate, epoch 2 halved
    show = run([str(Path(sys.executable).parent / "dvc"), "exp", "show", "--csv"], repo)
    assert "zaremba-small" in show and "test_ppl" in show
    rows = results_rows_of(repo, "zaremba-small")
    assert [r["variant"] for r in rows] == ["zaremba_small"]
    assert rows[0]["test_ppl"] < vocab  # learned something: better than a uniform guess
    assert rows[0]["book"] == "validation perplexity 120.7, test 114.5"


def results_rows_of(repo: Path, name: str) -> list[dict]:
    """The preset's rows as `python -m rnnlab.cli.presets --results` reads them, in `repo`."""
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        from rnnlab.cli.presets import results_rows
        return results_rows(name, "params.yaml", repo / PRESETS)
    finally:
        os.chdir(cwd)
