"""Text preparation, the vocabulary, and the tokenize stage's splits."""

import json

import numpy as np
import pytest

from rnnlab.config import Data, Split, Tokenize
from rnnlab.corpus import load_tokens, save_tokens, tokenize_corpus
from rnnlab.errors import UserError
from rnnlab.text import prepare_text, tokenize
from rnnlab.vocab import UNK, Vocab, build_vocab
from tests.conftest import shipped

TEXT = "The Time Machine, by H. G. Wells\n\nThe Time Traveller (for so\nit will be convenient) of\ncheerfulness 42.\n"


def test_book_normalisation_and_joining():
    # The book: non-letters to one space, lower case, lines glued with no separator.
    assert prepare_text(TEXT, "book", "none") == (
        "the time machine by h g wellsthe time traveller for soit will be convenient ofcheerfulness"
    )
    # Default: one space between lines, so `of` and `cheerfulness` stay two words.
    joined = prepare_text(TEXT, "book", "space")
    assert "of cheerfulness" in joined and "  " not in joined
    assert prepare_text("a b\nc", "plain", "newline") == "a b\nc"
    assert prepare_text("想要有直升机\n想要和你飞到宇宙去", "plain", "space") == "想要有直升机 想要和你飞到宇宙去"


def test_tokenize_char_and_word():
    assert tokenize("ab c", "char") == ["a", "b", " ", "c"]
    assert tokenize("ab  c\nd", "word") == ["ab", "c", "d"]


def test_vocab_from_training_counts():
    v = build_vocab(list("aababc"), min_freq=2)
    assert v.tokens == [UNK, "a", "b"]        # by falling frequency; 'c' is rarer than min_freq
    assert v.freqs == [1, 3, 2]               # <unk> counts the tokens mapped to it
    assert list(v.encode(list("abcz"))) == [1, 2, 0, 0]
    assert v.decode([1, 2, 0]) == "ab<unk>"
    assert Vocab.from_dict(v.to_dict()) == v


def test_splits_are_contiguous_and_vocab_is_from_train_only(tmp_path):
    raw = "abcd" * 20 + "xyz"  # x, y, z appear only at the end: in test
    tok = shipped(Tokenize, normalize="plain", split=Split(train=0.8, val=0.1, test=0.1))
    t = tokenize_corpus(raw, shipped(Data), tok)
    n = len(raw)
    assert [len(t.splits[s]) for s in ("train", "val", "test")] == [int(n * .8), int(n * .1), n - int(n * .8) - int(n * .1)]
    assert set(t.vocab.tokens) == {UNK, "a", "b", "c", "d"}
    assert t.stats["test_unk"] == 3 and t.stats["val_unk"] == 0
    assert t.vocab.decode(np.concatenate([t.splits[s] for s in ("train", "val", "test")])) == raw[:-3] + "<unk>" * 3
    save_tokens(t, tmp_path)
    back = load_tokens(tmp_path)
    assert back.vocab == t.vocab and all((back.splits[s] == t.splits[s]).all() for s in back.splits)


def test_own_splits_are_kept_and_max_tokens_cuts_train():
    raw = {"train": "hello world " * 10, "val": "world hello", "test": "hello there"}
    t = tokenize_corpus(raw, shipped(Data, corpus="custom", source="x", max_tokens=7),
                        shipped(Tokenize, token="word"))
    assert t.stats["own_splits"] and len(t.splits["train"]) == 7
    assert t.vocab.decode(t.splits["test"]) == "hello <unk>"


def test_timemachine_auto_normalisation_is_the_books():
    t = tokenize_corpus("The Time-Traveller!", shipped(Data),
                        shipped(Tokenize, split=Split(train=0.6, val=0.2, test=0.2)))
    assert t.stats["normalize"] == "book" and t.vocab.decode(t.splits["train"]).startswith("the time")


def test_vocab_json_says_how_text_became_tokens(tmp_path):
    """The resolved normalisation (book, never auto) and the line joining travel with the vocabulary."""
    t = tokenize_corpus(TEXT * 10, shipped(Data), shipped(Tokenize, join_lines="none"))
    assert (t.vocab.token_type, t.vocab.normalize, t.vocab.join_lines) == ("char", "book", "none")
    save_tokens(t, tmp_path)
    saved = json.loads((tmp_path / "vocab.json").read_text())
    assert (saved["token_type"], saved["normalize"], saved["join_lines"]) == ("char", "book", "none")
    assert load_tokens(tmp_path).vocab == t.vocab
    # the vocabulary turns text into tokens exactly as the corpus was turned
    assert t.vocab.text_tokens(TEXT) == tokenize(prepare_text(TEXT, "book", "none"), "char")


def test_vocab_json_without_the_text_fields_is_plain_text_joined_by_spaces(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"token_type": "word", "tokens": [UNK, "Time"], "freqs": [0, 1]}))
    v = Vocab.load(tmp_path / "vocab.json")
    assert (v.normalize, v.join_lines) == ("plain", "space")
    assert v.text_tokens(" Time\nMachine! ") == ["Time", "Machine!"]


@pytest.mark.parametrize("field,value", [("normalize", "auto"), ("join_lines", "tab"), ("token_type", "bpe")])
def test_a_vocabulary_with_an_unknown_text_setting_is_refused(field, value):
    with pytest.raises(ValueError, match=rf"vocabulary {field} = '{value}': must be one of"):
        Vocab.from_dict({**build_vocab(list("ab")).to_dict(), field: value})


def test_a_split_too_short_is_named():
    with pytest.raises(UserError, match=r"val split has 1 tokens.*tokenize.split.val"):
        tokenize_corpus("abcdefghijklmnopqrst", shipped(Data),
                        shipped(Tokenize, normalize="plain", split=Split(train=0.9, val=0.05, test=0.05)))
