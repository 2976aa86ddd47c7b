"""The vocabulary: token <-> id, built from the training split only, saved as readable JSON."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rnnlab.fileio import read_json, write_json
from rnnlab.text import detokenize

UNK = "<unk>"


@dataclass(frozen=True)
class Vocab:
    """Id 0 is `<unk>`; the other tokens follow by falling frequency, ties by token."""

    tokens: list[str]        # id -> token
    freqs: list[int]         # training-split count of each token (for <unk>: tokens mapped to it)
    token_type: str = "char"  # char | word: how ids decode back to text
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.tokens or self.tokens[0] != UNK:
            raise ValueError(f"a vocabulary starts with {UNK}")
        object.__setattr__(self, "index", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: list[str]) -> np.ndarray:
        """Ids of `tokens`; tokens not in the vocabulary become <unk> (id 0)."""
        return np.fromiter((self.index.get(t, 0) for t in tokens), dtype=np.int64, count=len(tokens))

    def unknown(self, tokens: list[str]) -> list[str]:
        return [t for t in tokens if t not in self.index]

    def decode(self, ids) -> str:
        return detokenize([self.tokens[int(i)] for i in ids], self.token_type)

    def to_dict(self) -> dict:
        return {"token_type": self.token_type, "tokens": self.tokens, "freqs": self.freqs}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(tokens=list(d["tokens"]), freqs=list(d["freqs"]), token_type=d["token_type"])

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        return cls.from_dict(read_json(path))


def build_vocab(train_tokens: list[str], min_freq: int = 1, token_type: str = "char") -> Vocab:
    """Tokens seen at least `min_freq` times in training, most frequent first, after <unk>."""
    counts = Counter(train_tokens)
    counts.pop(UNK, None)  # a literal "<unk>" in the text is the unknown token
    kept = sorted((t for t, n in counts.items() if n >= min_freq), key=lambda t: (-counts[t], t))
    rare = sum(n for t, n in counts.items() if n < min_freq) + train_tokens.count(UNK)
    return Vocab([UNK, *kept], [rare, *(counts[t] for t in kept)], token_type)
