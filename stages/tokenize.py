"""DVC stage `tokenize`: raw text -> token ids per split + vocabulary (see rnnlab/data/corpus.py)."""

from __future__ import annotations

import argparse

from rnnlab.config import load_params
from rnnlab.data.corpus import read_raw, save_tokens, summary_line, tokenize_corpus
from rnnlab.errors import run_program


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", required=True, help="the download stage's output folder")
    parser.add_argument("--out", required=True, help="folder for vocab.json, *.npy, stats.json")
    args = parser.parse_args()

    params = load_params(args.params)
    tokens = tokenize_corpus(read_raw(args.raw), params.data, params.tokenize)
    save_tokens(tokens, args.out)
    s = tokens.stats
    print(f"{s['corpus']} ({s['token']}, normalize={s['normalize']}, join_lines={s['join_lines']}): "
          f"{summary_line(s)}")


if __name__ == "__main__":
    run_program(main)
