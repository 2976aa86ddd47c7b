"""The built-in corpora: where each one comes from and how to check it.

This table is the one place these facts live; `params.yaml`'s `data.corpus` names a key of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Corpus:
    name: str
    url: str                   # where the book distributes it
    sha1: str                  # of the file at `url` (the zip itself for a zip)
    # for a zip: the text file inside it, or for a corpus with its own splits the file of each
    # (train.txt, val.txt, test.txt -> member)
    member: str | dict[str, str] | None = None
    normalize: str = "plain"   # what `tokenize.normalize: auto` means for this corpus
    join_lines: str = "space"  # what `tokenize.join_lines: auto` means (eos: newline for chars)
    bundled: str | None = None  # a copy shipped in this package (public-domain texts only)

    def bundled_path(self) -> Path | None:
        return HERE / self.bundled if self.bundled else None


BUILTIN: dict[str, Corpus] = {
    c.name: c
    for c in [
        # H. G. Wells, The Time Machine (public domain), as d2l distributes it.
        Corpus(
            name="timemachine",
            url="http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
            sha1="090b5e7e70c295757f55df93cb0a180b9691891a",
            normalize="book",
            bundled="timemachine.txt",
        ),
        # Jay Chou lyrics from the Chinese edition; not redistributable, so never bundled.
        Corpus(
            name="jaychou_lyrics",
            url="https://raw.githubusercontent.com/d2l-ai/d2l-zh/v1.0.0/data/jaychou_lyrics.txt.zip",
            sha1="9529987e701a4f37048ab778270a5dde9a762a0b",
            member="jaychou_lyrics.txt",
            normalize="plain",
        ),
        # Penn Treebank (Mikolov et al.'s preprocessing: 10,000 words, rare ones already <unk>,
        # one sentence per line), with its own splits, as d2l distributes it. Not redistributable.
        Corpus(
            name="ptb",
            url="http://d2l-data.s3-accelerate.amazonaws.com/ptb.zip",
            sha1="319d85e578af0cdc590547f26231e4e31cdf1e42",
            member={"train.txt": "ptb/ptb.train.txt", "val.txt": "ptb/ptb.valid.txt",
                    "test.txt": "ptb/ptb.test.txt"},
            normalize="plain",
            join_lines="eos",
        ),
    ]
}
