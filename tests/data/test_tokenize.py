"""Text preparation, the vocabulary, and the tokenize stage's splits."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from rnnlab.config import Data, Split, Tokenize
from rnnlab.data.corpus import (
    load_tokens,
    resolve_join_lines,
    save_tokens,
    tokenize_corpus,
)
from rnnlab.data.text import EOS, detokenize, prepare_text, text_tokens, tokenize
from rnnlab.data.vocab import UNK, Vocab, build_vocab
from rnnlab.errors import UserError
from tests.conftest import shipped, shipped_params
from tests.stagerun import in_process


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


def test_char_tokens_are_characters_word_tokens_split_on_whitespace():
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


# ---------------------------------------------------------------------------------------------
# join_lines: eos, an <eos> word token after every line


@pytest.mark.parametrize("text, tokens", [
    ("a b\nc d\n", ["a", "b", EOS, "c", "d", EOS]),      # the last line's break counts too
    ("a b\nc d", ["a", "b", EOS, "c", "d"]),              # a prefix without a final break: none
    ("a\n\nb\n", ["a", EOS, EOS, "b", EOS]),             # a blank line is a line
    ("\n", [EOS]),
    ("a b\r\nc\r\n", ["a", "b", EOS, "c", EOS]),        # CRLF is one line end, not two
    ("a\rb\r", ["a", EOS, "b", EOS]),                     # old Mac line ends
    (" a  b \n", ["a", "b", EOS]),                         # PTB's own spacing around words
    ("", []),
])
def test_eos_after_every_line_break(text, tokens):
    assert text_tokens(text, "word", "plain", "eos") == tokens


def test_eos_lines_are_normalised_before_their_eos():
    # book normalisation would turn a literal "<eos>" into "eos": the line end is added after it
    assert text_tokens("The Time-Traveller!\n42\nHe said.", "word", "book", "eos") == [
        "the", "time", "traveller", EOS, EOS, "he", "said"]
    assert text_tokens("Hello World\n", "word", "lower", "eos") == ["hello", "world", EOS]
    # a line end never glues the words around it, whatever the normalisation
    for normalize in ("book", "lower", "plain"):
        assert text_tokens("of\ncheerfulness\n", "word", normalize, "eos") == [
            "of", EOS, "cheerfulness", EOS]


@pytest.mark.parametrize("normalize", ["book", "lower", "plain"])
@pytest.mark.parametrize("sep", ["\x0c", "\x85", "\u2028"])
def test_eos_keeps_words_apart_at_other_line_separators(normalize, sep):
    """str.splitlines also breaks at form feed, NEL and U+2028. With join_lines: space those keep
    the words on either side apart; with eos each is a line end like any other."""
    text = f"alpha{sep}beta\n"
    assert text_tokens(text, "word", normalize, "space") == ["alpha", "beta"]
    assert text_tokens(text, "word", normalize, "eos") == ["alpha", EOS, "beta", EOS]


@pytest.mark.parametrize("tokens, text", [
    (["a", "b", EOS, "c", EOS], "a b\nc\n"),                # no space either side of a line break
    ([EOS, EOS, "a"], "\n\na"),
    (["a", EOS, EOS, "b"], "a\n\nb"),
    (["a", "x<eos>", "<eos>y", "<eos>>", "b"], "a x<eos> <eos>y <eos>> b"),  # merely contains it
    (["<EOS>", "a"], "<EOS> a"),
])
def test_detokenize_shows_eos_as_a_line_break(tokens, text):
    assert detokenize(tokens, "word") == text


def test_detokenize_leaves_eos_characters_alone():
    assert detokenize(list("<eos>\n"), "char") == "<eos>\n"


@pytest.mark.parametrize("text", [
    "the cat sat\non the mat\n",
    "no <unk> here\n\nlast line without a break",
    "one\n",
])
def test_word_text_with_eos_round_trips(text):
    assert detokenize(text_tokens(text, "word", "plain", "eos"), "word") == text
    v = build_vocab(text_tokens(text, "word", "plain", "eos"), token_type="word", join_lines="eos")
    assert v.decode(v.encode(v.text_tokens(text))) == text


@pytest.mark.parametrize("corpus, token, expected", [
    ("ptb", "word", "eos"),
    ("ptb", "char", "newline"),
    ("timemachine", "char", "space"),
    ("timemachine", "word", "space"),
    ("jaychou_lyrics", "char", "space"),
    ("custom", "word", "space"),
])
def test_join_lines_auto_is_the_corpus_own(corpus, token, expected):
    data = shipped(Data, corpus=corpus, source="x.txt" if corpus == "custom" else None)
    assert resolve_join_lines(data, shipped(Tokenize, token=token, join_lines="auto")) == expected


@pytest.mark.parametrize("corpus", ["ptb", "timemachine", "custom"])
@pytest.mark.parametrize("token, join_lines", [
    ("word", "eos"), ("word", "space"), ("word", "none"),
    ("char", "newline"), ("char", "space"), ("char", "none"),
])
def test_an_explicit_join_lines_is_kept(corpus, token, join_lines):
    data = shipped(Data, corpus=corpus, source="x.txt" if corpus == "custom" else None)
    assert resolve_join_lines(data, shipped(Tokenize, token=token, join_lines=join_lines)) == join_lines


# A Penn-Treebank-shaped corpus: one sentence a line, a space either side, rare words already <unk>.
PTB = {
    "train": " the cat sat \n the <unk> sat on the mat \n a cat \n",
    "val": " the <unk> \n the dog \n",     # dog: not in train
    "test": " a mat \n",
}


def _counts(text: str) -> tuple[int, int]:
    return len(text.split()), text.count("\n")


def test_ptb_word_tokens_have_eos_and_unk():
    t = tokenize_corpus(PTB, shipped(Data, corpus="ptb"), shipped(Tokenize, token="word"))
    for s in ("train", "val", "test"):  # every word and every line end is a token
        words, lines = _counts(PTB[s])
        assert t.stats[f"{s}_tokens"] == len(t.splits[s]) == words + lines
    assert t.stats["join_lines"] == "eos" and t.stats["normalize"] == "plain"
    assert t.stats["own_splits"] is True and t.vocab.join_lines == "eos"
    assert EOS in t.vocab.tokens and t.vocab.freqs[t.vocab.index[EOS]] == 3
    assert t.vocab.tokens.count(UNK) == 1 and t.vocab.index[UNK] == 0
    # the text's own <unk> is id 0 and is counted; so is a word the training split never had
    assert t.stats["train_unk"] == 1 and t.vocab.freqs[0] == 1
    assert t.stats["val_unk"] == 2 and t.stats["test_unk"] == 0
    assert list(t.splits["val"]).count(0) == 2
    assert t.vocab.decode(t.splits["val"]) == "the <unk>\nthe <unk>\n"
    assert t.stats["vocab_size"] == len(t.vocab) == len({UNK, EOS, "the", "cat", "sat", "on", "mat", "a"})


def test_ptb_char_tokens_end_lines_with_a_newline():
    t = tokenize_corpus(PTB, shipped(Data, corpus="ptb"), shipped(Tokenize, token="char"))
    assert t.stats["join_lines"] == "newline" and EOS not in t.vocab.tokens and "\n" in t.vocab.tokens
    assert t.vocab.decode(t.splits["test"]) == " a mat "  # lines joined by "\n", none after the last


def _tokenize_stage(tmp_path: Path, overlay: dict, raw: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m stages.tokenize` in tmp_path on params.yaml with `overlay`, raw/<split>.txt = raw,
    as DVC runs it (tests/stagerun.py)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(shipped_params(overlay)))
    (tmp_path / "raw").mkdir()
    for split, text in raw.items():
        (tmp_path / "raw" / f"{split}.txt").write_text(text, encoding="utf-8")
    return in_process("tokenize", "--params", "params.yaml", "--raw", "raw", "--out", "out",
                      cwd=tmp_path)


def test_tokenize_stage_on_ptb_prints_its_counts(tmp_path):
    run = _tokenize_stage(tmp_path, {"data": {"corpus": "ptb"},
                                     "tokenize": {"token": "word", "join_lines": "auto"}}, PTB)
    assert run.returncode == 0, run.stderr
    # train 11 words + 3 line ends, val 4 + 2, test 2 + 1; vocab <unk> <eos> the cat sat on mat a
    assert run.stdout == ("ptb (word, normalize=plain, join_lines=eos): train 14 tokens | val 6 | "
                          "test 3 | vocab 8 | <unk> in val 2, test 0\n")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["join_lines"] == "eos" and stats["train_tokens"] == 14
    assert load_tokens(tmp_path / "out").vocab.join_lines == "eos"


@pytest.mark.parametrize("token, join_lines", [("char", "eos"), ("word", "newline")])
def test_tokenize_stage_refuses_line_ends_the_tokens_cannot_hold(tmp_path, token, join_lines):
    run = _tokenize_stage(tmp_path, {"data": {"corpus": "ptb"},
                                     "tokenize": {"token": token, "join_lines": join_lines}}, PTB)
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr
    assert f"tokenize.join_lines = '{join_lines}'" in lines[0]
    assert not (tmp_path / "out").exists()
