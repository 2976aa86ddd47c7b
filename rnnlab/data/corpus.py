"""A prepared corpus on disk: raw text in, token ids per split and a vocabulary out.

Layout of the tokenize stage's output folder (the training stages read it with `load_tokens`):
    vocab.json                 the Vocab: token_type, normalize, join_lines, tokens (id order),
                               training frequencies
    train.npy val.npy test.npy token ids (int64), one array per split
    stats.json                 counts and the settings that made them
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnlab.config import Data, Tokenize
from rnnlab.corpora import BUILTIN
from rnnlab.data.text import text_tokens
from rnnlab.data.vocab import Vocab, build_vocab
from rnnlab.errors import UserError
from rnnlab.fileio import atomic_path, read_json, write_json

SPLITS = ("train", "val", "test")
MIN_SPLIT_TOKENS = 2  # one input and one target


@dataclass(frozen=True)
class Tokens:
    splits: dict[str, np.ndarray]  # split name -> ids
    vocab: Vocab
    stats: dict


def read_raw(raw_dir: str | Path) -> dict[str, str] | str:
    """The download stage's output: one text (corpus.txt), or its own train/val/test texts."""
    raw_dir = Path(raw_dir)
    if (raw_dir / "corpus.txt").is_file():
        return (raw_dir / "corpus.txt").read_text(encoding="utf-8")
    if all((raw_dir / f"{s}.txt").is_file() for s in SPLITS):
        return {s: (raw_dir / f"{s}.txt").read_text(encoding="utf-8") for s in SPLITS}
    raise UserError(f"{raw_dir}: no corpus.txt nor train/val/test.txt; run the download stage first")


def resolve_normalize(data: Data, tok: Tokenize) -> str:
    """`auto` means the corpus's own default: the book's for timemachine, plain otherwise."""
    if tok.normalize != "auto":
        return tok.normalize
    return BUILTIN[data.corpus].normalize if data.corpus in BUILTIN else "plain"


def resolve_join_lines(data: Data, tok: Tokenize) -> str:
    """`auto` means the corpus's own line ends: `eos` for PTB's word tokens (a "\n" for its
    characters), a space for the others."""
    if tok.join_lines != "auto":
        return tok.join_lines
    own = BUILTIN[data.corpus].join_lines if data.corpus in BUILTIN else "space"
    return "newline" if own == "eos" and tok.token == "char" else own


def split_tokens(tokens: list[str], tok: Tokenize) -> dict[str, list[str]]:
    """Contiguous train / val / test pieces, in that order, by the configured fractions."""
    n = len(tokens)
    n_train = int(n * tok.split.train)
    n_val = int(n * tok.split.val)
    return {
        "train": tokens[:n_train],
        "val": tokens[n_train : n_train + n_val],
        "test": tokens[n_train + n_val :],
    }


def tokenize_corpus(raw: dict[str, str] | str, data: Data, tok: Tokenize) -> Tokens:
    """The tokenize stage's work, without I/O."""
    normalize, join_lines = resolve_normalize(data, tok), resolve_join_lines(data, tok)

    def to_tokens(text: str) -> list[str]:
        return text_tokens(text, tok.token, normalize, join_lines)

    own_splits = isinstance(raw, dict)
    pieces = {s: to_tokens(raw[s]) for s in SPLITS} if own_splits else split_tokens(to_tokens(raw), tok)
    if data.max_tokens is not None:
        pieces["train"] = pieces["train"][: data.max_tokens]
    for name, toks in pieces.items():
        if len(toks) < MIN_SPLIT_TOKENS:
            where = f"the corpus's own {name}.txt" if own_splits else f"tokenize.split.{name}"
            raise UserError(
                f"the {name} split has {len(toks)} tokens (from {where}); it needs at least "
                f"{MIN_SPLIT_TOKENS}: use a larger corpus or a larger fraction"
            )
    vocab = build_vocab(pieces["train"], tok.min_freq, tok.token, normalize, join_lines)
    ids = {s: vocab.encode(toks) for s, toks in pieces.items()}
    stats = {
        "corpus": data.corpus,
        "token": tok.token,
        "normalize": normalize,
        "join_lines": join_lines,
        "own_splits": own_splits,
        "vocab_size": len(vocab),
        **{f"{s}_tokens": len(ids[s]) for s in SPLITS},
        **{f"{s}_unk": int((ids[s] == 0).sum()) for s in SPLITS},
    }
    return Tokens(ids, vocab, stats)


def summary_line(stats: dict) -> str:
    """`train 153,522 tokens | val 8,530 | test 8,530 | vocab 28 | <unk> in val 0, test 0`."""
    return (
        f"train {stats['train_tokens']:,} tokens | val {stats['val_tokens']:,} | "
        f"test {stats['test_tokens']:,} | vocab {stats['vocab_size']:,} | "
        f"<unk> in val {stats['val_unk']:,}, test {stats['test_unk']:,}"
    )


def save_tokens(tokens: Tokens, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    for name, ids in tokens.splits.items():
        with atomic_path(out_dir / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, ids)
    tokens.vocab.save(out_dir / "vocab.json")
    write_json(out_dir / "stats.json", tokens.stats)


def load_tokens(tokens_dir: str | Path) -> Tokens:
    tokens_dir = Path(tokens_dir)
    if not (tokens_dir / "vocab.json").is_file():
        raise UserError(f"{tokens_dir}: no vocab.json; run the tokenize stage first")
    try:
        splits = {s: np.load(tokens_dir / f"{s}.npy") for s in SPLITS}
        return Tokens(splits, Vocab.load(tokens_dir / "vocab.json"), read_json(tokens_dir / "stats.json"))
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:  # missing, truncated, corrupt
        where = getattr(err, "filename", None) or tokens_dir
        raise UserError(f"{where}: unreadable token data ({type(err).__name__}: {err}); run the "
                        "tokenize stage again") from None
