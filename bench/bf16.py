"""train.bf16 against float32 on a default run: validation perplexity and speed, side by side.

    python -m bench.bf16                       # every variant of params.yaml
    python -m bench.bf16 --variants lstm --threads 1

Each variant trains twice from the same seed on the defaults (params.yaml, The Time Machine): in
float32, then under bfloat16 autocast. Prints per variant each best validation perplexity, their
relative difference (the bar: within 1%) and each mean tokens/s. Without bfloat16 hardware
(AMX, AVX512-BF16) oneDNN emulates it: the perplexities still hold, the speeds do not.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.lib import ROOT
from bench.lib.streams import time_machine
from rnnlab.config import load_params, variant_train
from rnnlab.kernels import choice
from rnnlab.models.lm import new_model
from rnnlab.training.loop import new_state, run_epochs
from rnnlab.training.precision import bf16_hardware


def train_once(params, name: str, bf16: bool, train_ids, val_ids, vocab_size: int) -> dict:
    cfg = variant_train(params, name).model_copy(update={"bf16": bf16, "device": "cpu"})
    torch.manual_seed(cfg.seed)
    state = new_state(new_model(params.variants[name], cfg, vocab_size), cfg)
    results = list(run_epochs(state, train_ids, val_ids, cfg, torch.device("cpu")))
    return {"best_val_ppl": state.best_val_ppl, "best_epoch": state.best_epoch,
            "tokens_per_sec": sum(r.tokens_per_sec for r in results) / len(results)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", help="names in params.yaml (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    train_ids, val_ids, vocab = time_machine(params.tokenize)
    print(f"{choice.cpu_model()}: bfloat16 in hardware: {bf16_hardware(torch.device('cpu'))}; "
          f"{args.threads} thread(s)")
    rows = {}
    for name in args.variants or list(params.variants):
        f32, b16 = (train_once(params, name, bf16, train_ids, val_ids, len(vocab))
                    for bf16 in (False, True))
        change = b16["best_val_ppl"] / f32["best_val_ppl"] - 1
        rows[name] = {"float32": f32, "bfloat16": b16, "val_ppl_change": change}
        print(f"{name}: val ppl {f32['best_val_ppl']:.4f} (float32) vs {b16['best_val_ppl']:.4f} "
              f"(bfloat16): {change:+.2%}; {f32['tokens_per_sec']:,.0f} vs "
              f"{b16['tokens_per_sec']:,.0f} tok/s ({b16['tokens_per_sec'] / f32['tokens_per_sec']:.2f}x)",
              flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
