"""The vocabulary: token <-> id, built from the training split only, saved as readable JSON.

It also carries how its corpus's text became tokens (token type, normalisation, line joining),
so a checkpoint, which stores it, turns new text (a prefix) into ids exactly as the corpus was.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rnnlab.data.text import NORMALIZERS, SEPARATORS, detokenize, text_tokens
from rnnlab.fileio import read_json, write_json

UNK = "<unk>"
TOKEN_TYPES = ("char", "word")


@dataclass(frozen=True)
class Vocab:
    """Id 0 is `<unk>`; the other tokens follow by falling frequency, ties by token."""

    tokens: list[str]         # id -> token
    freqs: list[int]          # training-split count of each token (for <unk>: tokens mapped to it)
    token_type: str = "char"  # char | word: how text splits into tokens and ids decode back
    normalize: str = "plain"  # the corpus's resolved normalisation (book | lower | plain; never auto)
    join_lines: str = "space"  # how the corpus's lines were joined (space | none | newline | eos)
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.tokens or self.tokens[0] != UNK:
            raise ValueError(f"a vocabulary starts with {UNK}")
        for name, allowed in (("token_type", TOKEN_TYPES), ("normalize", tuple(NORMALIZERS)),
                              ("join_lines", tuple(SEPARATORS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"vocabulary {name} = {getattr(self, name)!r}: "
                                 f"must be one of {', '.join(allowed)}")
        object.__setattr__(self, "index", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def text_tokens(self, text: str) -> list[str]:
        """`text` as tokens, normalised and joined as the corpus was (tokens need not be known)."""
        return text_tokens(text, self.token_type, self.normalize, self.join_lines)

    def encode(self, tokens: list[str]) -> np.ndarray:
        """Ids of `tokens`; tokens not in the vocabulary become <unk> (id 0)."""
        return np.fromiter((self.index.get(t, 0) for t in tokens), dtype=np.int64, count=len(tokens))

    def unknown(self, tokens: list[str]) -> list[str]:
        return [t for t in tokens if t not in self.index]

    def decode(self, ids) -> str:
        return detokenize([self.tokens[int(i)] for i in ids], self.token_type)

    def to_dict(self) -> dict:
        return {"token_type": self.token_type, "normalize": self.normalize,
                "join_lines": self.join_lines, "tokens": self.tokens, "freqs": self.freqs}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        # vocab.json and checkpoints from before normalize / join_lines were stored: read as
        # plain text with lines joined by a space
        return cls(tokens=list(d["tokens"]), freqs=list(d["freqs"]), token_type=d["token_type"],
                   normalize=d.get("normalize", "plain"), join_lines=d.get("join_lines", "space"))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        return cls.from_dict(read_json(path))


def build_vocab(train_tokens: list[str], min_freq: int = 1, token_type: str = "char",
                normalize: str = "plain", join_lines: str = "space") -> Vocab:
    """Tokens seen at least `min_freq` times in training, most frequent first, after <unk>;
    `token_type`, `normalize`, `join_lines`: how the corpus's text became `train_tokens`."""
    counts = Counter(train_tokens)
    counts.pop(UNK, None)  # a literal "<unk>" in the text is the unknown token
    kept = sorted((t for t, n in counts.items() if n >= min_freq), key=lambda t: (-counts[t], t))
    rare = sum(n for t, n in counts.items() if n < min_freq) + train_tokens.count(UNK)
    return Vocab([UNK, *kept], [rare, *(counts[t] for t in kept)], token_type, normalize, join_lines)
