"""From raw text to a token sequence: normalisation, line ends, tokenisation.

The book (d2l, section 8.2) normalises The Time Machine line by line (every run of non-letters
becomes one space, then strip and lower-case) and concatenates the lines with NO separator, which
glues the last word of a line to the first of the next (`of` + `cheerfulness` -> `ofcheerfulness`).
Here `join_lines` says what a line end becomes (`prepare_text`). The vocabulary stores the token
type, the (resolved) normalisation and the line ends of its corpus, so a prefix given to a
trained model becomes tokens exactly as the corpus did (`text_tokens`): with `book`, "Time
Traveller!" is read as "time traveller"; with `eos`, a prefix ending in a line break ends in
`<eos>`, one without does not.
"""

from __future__ import annotations

import re

EOS = "<eos>"  # the end-of-line token of join_lines: eos

NORMALIZERS = {
    "book": lambda line: re.sub("[^A-Za-z]+", " ", line).strip().lower(),
    "lower": str.lower,
    "plain": lambda line: line,
}
SEPARATORS = {"space": " ", "none": "", "newline": "\n", "eos": f" {EOS} "}


def prepare_text(text: str, normalize: str, join_lines: str) -> str:
    """Normalise each line, then join the lines; `join_lines` says what a line end becomes:

        space    one space (the default; blank lines dropped)
        none     nothing: the book's exact text
        newline  a "\n" character, a token the model predicts (char tokens)
        eos      an `<eos>` token after every line, the model predicts it: the Penn Treebank and
                 WikiText convention (word tokens; config.py refuses it with char tokens, and
                 `newline` with word tokens, which split on whitespace)

    Every line break counts, the one ending the last line too (a text without a final line
    break has no `<eos>` at its end: a prefix), and a line's own text is normalised before its
    end is added."""
    if join_lines == "eos":  # every line break, the last one's too, becomes " <eos> "
        out = []
        for line in text.splitlines(keepends=True):  # each piece ends in at most one break
            content = (line.splitlines() or [""])[0]  # without it, whichever break it is
            out.append(NORMALIZERS[normalize](content) + (SEPARATORS["eos"] if content != line else ""))
        return "".join(out)
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
    """Tokens as text: characters joined, words joined by a space, `<eos>` shown as a line break."""
    if token == "char":
        return "".join(tokens)
    return re.sub(rf" ?(?<!\S){re.escape(EOS)}(?!\S) ?", "\n", " ".join(tokens))
