"""Stage `download`: fetch and check the corpus of params.yaml's `data` section into --out.

    python -m stages.download --out data/raw [--params params.yaml]

Writes out/corpus.txt (or out/train.txt, val.txt, test.txt) and out/source.json; see
rnnlab/data/download.py for where the text comes from and how it is checked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rnnlab.config import load_params
from rnnlab.data.download import prepare_raw
from rnnlab.errors import run_program


def main() -> None:
    parser = argparse.ArgumentParser(description="Fetch and check the corpus into --out.")
    parser.add_argument("--params", default="params.yaml", help="params file (its data section)")
    parser.add_argument("--out", required=True, help="output folder, e.g. data/raw")
    args = parser.parse_args()

    params = load_params(args.params)
    info = prepare_raw(params.data, args.out)
    print(summary(info, Path(args.out)))


def summary(info: dict, out: Path) -> str:
    """One line: `timemachine: 178,979 characters from <source> (sha1 090b5e7e…) -> <files>`."""
    files = ["train.txt", "val.txt", "test.txt"] if info["splits"] else ["corpus.txt"]
    m = info["member"]
    member = (f"zip members {', '.join(m.values())}, " if isinstance(m, dict) else
              f"zip member {m}, " if m else "")
    sha1 = f"sha1 {info['sha1'][:8]}…" if info["sha1"] else "a folder, no sha1"
    targets = ", ".join(str(out / name) for name in files)
    return (
        f"{info['corpus']}: {info['chars']:,} characters from {info['source']} "
        f"({member}{sha1}) -> {targets}"
    )


if __name__ == "__main__":
    run_program(main)
