"""Time per epoch of a word-level preset on this machine, extrapolated from part of an epoch.

    python -m bench.preset_speed zaremba-medium wlm-tied --ptb /path/to/ptb.zip

For each preset: its validated params, Penn Treebank read and tokenized by the pipeline's code,
the model built as the train stage builds it, then `--steps` minibatches of its real training
step (after `--warmup` untimed) and the validation perplexity of `--val-tokens` tokens. An epoch
is the training split at the measured tokens/s plus the validation split at its rate: for presets
too slow to run to the end here. Prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import torch  # noqa: E402

from bench.lib import ROOT  # noqa: E402
from rnnlab.cli.presets import PRESETS, load_preset, merged  # noqa: E402
from rnnlab.config import read_yaml, validate_params, variant_train  # noqa: E402
from rnnlab.data.batches import num_batches, sequential_batches  # noqa: E402
from rnnlab.data.corpus import read_raw, tokenize_corpus  # noqa: E402
from rnnlab.data.download import prepare_raw  # noqa: E402
from rnnlab.models.dispatch import detach_state  # noqa: E402
from rnnlab.models.lm import new_model  # noqa: E402
from rnnlab.training.loop import make_optimizer, perplexity, train_step  # noqa: E402


def measure(name: str, ptb: str, steps: int, warmup: int, val_tokens: int) -> dict:
    overlay = load_preset(name, ROOT / PRESETS)
    raw = merged(read_yaml(ROOT / "params.yaml"), overlay)
    raw["data"]["source"] = ptb
    params = validate_params(raw, f"presets/{name}.yaml")
    variant = next(iter(params.variants))
    cfg = variant_train(params, variant)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_raw(params.data, Path(tmp) / "raw")
        tokens = tokenize_corpus(read_raw(Path(tmp) / "raw"), params.data, params.tokenize)
    train_ids, val_ids = (torch.as_tensor(tokens.splits[s]) for s in ("train", "val"))

    torch.manual_seed(cfg.seed)
    model = new_model(params.variants[variant], cfg, len(tokens.vocab))
    opt = make_optimizer(model, cfg)
    batches = sequential_batches(train_ids, cfg.batch_size, cfg.num_steps, torch.Generator().manual_seed(0))
    h, start = None, 0.0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        if i == warmup + steps:
            break
        h = detach_state(h) if h is not None else None
        h, loss, _ = train_step(model, x, y, h, opt, cfg.clip_theta)
        float(loss)  # keep the timed steps honest: wait for each one
    tok_s = steps * cfg.batch_size * cfg.num_steps / (time.perf_counter() - start)
    start = time.perf_counter()
    perplexity(model, val_ids[:val_tokens])
    val_tok_s = val_tokens / (time.perf_counter() - start)
    per_epoch_train = num_batches(len(train_ids), cfg.batch_size, cfg.num_steps) * cfg.batch_size * cfg.num_steps
    epoch_s = per_epoch_train / tok_s + len(val_ids) / val_tok_s
    return {"preset": name, "variant": variant, "train_tok_s": tok_s, "val_tok_s": val_tok_s,
            "epoch_s": epoch_s, "epochs": cfg.epochs, "run_h": epoch_s * cfg.epochs / 3600,
            "steps": steps, "val_tokens": val_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--ptb", required=True, help="a copy of d2l's ptb.zip (sha1 checked)")
    parser.add_argument("--steps", type=int, default=40, help="timed training minibatches")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--val-tokens", type=int, default=4000, help="validation tokens timed")
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| preset | train tok/s | validation tok/s | one epoch (extrapolated) | epochs | whole run |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.presets:
        r = measure(name, args.ptb, args.steps, args.warmup, args.val_tokens)
        print(f"| {r['preset']} | {r['train_tok_s']:,.0f} | {r['val_tok_s']:,.0f} | "
              f"{r['epoch_s'] / 60:.1f} min | {r['epochs']} | {r['run_h']:.1f} h |", flush=True)
    print(f"(from {args.steps} timed minibatches after {args.warmup} untimed, and "
          f"{args.val_tokens:,} validation tokens, per preset)")


if __name__ == "__main__":
    main()
