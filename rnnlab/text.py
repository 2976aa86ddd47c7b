"""From raw text to a token sequence: normalisation, line joining, tokenisation.

The book (d2l, section 8.2) normalises The Time Machine line by line (every run of non-letters
becomes one space, then strip and lower-case) and concatenates the lines with NO separator, which
glues the last word of a line to the first of the next (`of` + `cheerfulness` -> `ofcheerfulness`).
Here lines are joined with one space by default (`join_lines: space`, blank lines dropped);
`join_lines: none` reproduces the book exactly, `newline` keeps line breaks as tokens.

The vocabulary stores the token type, the (resolved) normalisation and the line joining of its
corpus, so a prefix given to a trained model becomes tokens exactly as the corpus did
(`text_tokens`): with `book`, "Time Traveller!" is read as "time traveller".
"""

from __future__ import annotations

import re

NORMALIZERS = {
    "book": lambda line: re.sub("[^A-Za-z]+", " ", line).strip().lower(),
    "lower": str.lower,
    "plain": lambda line: line,
}
SEPARATORS = {"space": " ", "none": "", "newline": "\n"}


def prepare_text(text: str, normalize: str, join_lines: str) -> str:
    """Normalise each line, then join the lines (see the module docstring)."""
    lines = [NORMALIZERS[normalize](line) for line in text.splitlines()]
    if join_lines == "space":
        lines = [line.strip() for line in lines if line.strip()]  # no runs of spaces at line ends
    return SEPARATORS[join_lines].join(lines)


def tokenize(text: str, token: str) -> list[str]:
    """Characters, or whitespace-separated words."""
    return list(text) if token == "char" else text.split()


def text_tokens(text: str, token: str, normalize: str, join_lines: str) -> list[str]:
    """Raw text -> tokens: the one way text becomes tokens, for the corpus and for prefixes."""
    return tokenize(prepare_text(text, normalize, join_lines), token)


def detokenize(tokens: list[str], token: str) -> str:
    return "".join(tokens) if token == "char" else " ".join(tokens)
