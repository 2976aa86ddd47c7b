"""Our training step against the book's, interleaved in one process, per variant and batch size.

    python -m bench.benchmark                  # every variant of params.yaml, batch 32 and 512
    python -m bench.benchmark --quick          # a smoke run: few steps, short extras
    python -m bench.benchmark --word-only --ptb ptb.zip   # the word rows alone, on PTB's words

Both sides of a row (bench/lib/book_vs_ours.py) train on the same minibatches, their order
alternating each repeat; a row's ratio is the median of its repeats' ratios, its bound every FLOP
at this machine's best matmul rate. Also: generation, evaluation, a no-op `dvc repro`, tracking's
share. Writes metrics/bench/<cpu-kind>.md and .json (other settings: <cpu-kind>-partial.*).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch  # noqa: E402

from bench.lib import ROOT  # noqa: E402
from bench.lib.book_vs_ours import (  # noqa: E402
    BOOK,
    WORD,
    WORD_BASELINE,
    WORD_VARIANT,
    baseline_name,
    word_config,
)
from bench.lib.dvc_and_tracking import noop_repro_seconds, tracking_share  # noqa: E402
from bench.lib.flops import (  # noqa: E402
    GATES,
    bound_tokens_per_sec,
    forward_flops,
    train_flops,
)
from bench.lib.machine import machine  # noqa: E402
from bench.lib.report import kilo, markdown, summarize  # noqa: E402
from bench.lib.streams import time_machine, word_data, word_shapes  # noqa: E402
from bench.lib.timing import (  # noqa: E402
    Pair,
    inference_speeds,
    keep_freed_memory,
    matmul_rates,
    time_pair,
    time_word_pair,
)
from rnnlab.config import load_params, resolve_train  # noqa: E402
from rnnlab.kernels import choice  # noqa: E402
from rnnlab.models.lm import ModelConfig, model_config  # noqa: E402
from rnnlab.training import loop as training  # noqa: E402
from rnnlab.training.precision import bf16_hardware  # noqa: E402


def char_configs(params, names: list[str], vocab_size: int) -> dict[str, ModelConfig]:
    """The char-level rows' models: each variant of params.yaml at the book's settings."""
    unknown = [n for n in names if n not in params.variants]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; params.yaml has "
                         f"{', '.join(params.variants)}")
    configs = {}
    for name in names:
        cfg = model_config(params.variants[name], resolve_train(params, name), vocab_size)
        configs[name] = ModelConfig(**{**asdict(cfg), "hidden_size": BOOK["hidden_size"],
                                       "dropout": 0.0})
    return configs


def _progress(name: str, batch: int, baseline: str, s: dict) -> None:
    print(f"{name:>14} batch {batch:>4}: {baseline} {kilo(s['book']['median']):>8}  ours "
          f"{kilo(s['ours']['median']):>8} tok/s  {s['ratio']:.2f}x  "
          f"{s['ours']['median'] / s['bound']:.0%} of bound"
          + (f"; ours bf16 {kilo(s['ours_bf16']['median']):>8} tok/s  {s['ratio_bf16']:.2f}x  "
             f"{s['ours_bf16']['median'] / s['bound_bf16']:.0%} of its bound"
             if s.get("ours_bf16") else ""), flush=True)


def run(args: argparse.Namespace) -> dict:
    with choice.afresh():  # this run's own measurements, not the cache's
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    device = training.resolve_device(args.device)
    load_before = os.getloadavg()[0]
    count = args.warmup + args.steps * args.repeats  # minibatches per side
    configs, shapes = {}, []
    if not args.word_only:
        params = load_params(ROOT / "params.yaml")
        train_ids, val_ids, vocab = time_machine(params.tokenize)
        configs = char_configs(params, args.variants or list(params.variants), len(vocab))
        hidden = BOOK["hidden_size"]
        widths = sorted({GATES[c.cell] * hidden for c in configs.values()})
        shapes += [(b, hidden, w) for b in args.batches for w in widths]
    if not args.skip_word:
        word_ids, word_vocab, word_source = word_data(args.ptb, count)
        word_cfg = word_config(word_vocab)
        parts = word_shapes(word_cfg, WORD["batch"], WORD["num_steps"])
        shapes += [shape for shape in parts.values() if shape not in shapes]
        print(f"word rows: {word_source}", flush=True)
    big = 512 if args.quick else 2048
    shapes.append((big, big, big))
    print(f"matmul rates: {len(shapes)} shapes ...", flush=True)
    seconds = 0.2 if args.quick else 1.0
    matmul = matmul_rates(shapes, seconds, device)
    bf16 = bf16_hardware(device) or args.bf16
    matmul_bf16 = matmul_rates(shapes, seconds, device, torch.bfloat16) if bf16 else []
    for reason in {r["onednn_skipped"] for r in matmul_bf16 if "onednn_skipped" in r}:
        print(f"bf16 matmul rates: {reason}; torch.mm's emulated rate only", flush=True)
    # The bound: every FLOP at the best rate the machine reached in the row's precision; a
    # bfloat16 row's products may also run in float32 (autocast keeps some there).
    best = max(r["best"] for r in matmul) * 1e9  # FLOP/s
    best_bf16 = max([best] + [r["best"] * 1e9 for r in matmul_bf16])

    pairs = []
    for name, cfg in configs.items():
        for batch in args.batches:
            pair = Pair(name, batch, asdict(cfg), baseline_name(cfg), train_flops(cfg))
            time_pair(pair, cfg, train_ids, args.steps, args.repeats, args.warmup, device,
                      True if args.bf16 else "auto")
            s = summarize(pair, bound_tokens_per_sec(pair.flops_per_token, best),
                          bound_tokens_per_sec(pair.flops_per_token, best_bf16))
            _progress(name, batch, "book", s)
            pairs.append(s)

    result = {"date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": {**machine(), "device": str(device), "load_average_before": load_before},
              "command": " ".join(["python -m bench.benchmark", *args.argv]),
              "vocab_size": None if args.word_only else len(vocab),
              "malloc_keeps_freed_memory": kept,
              "settings": {"steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                           "batches": args.batches, **BOOK,
                           "tracking_variant": next(iter(configs), None)},
              "matmul": matmul, "matmul_bf16": matmul_bf16, "training": pairs, "full": args.full}
    result["kernels"] = choice.report()

    if not args.skip_word:
        pair = Pair(WORD_VARIANT, WORD["batch"], asdict(word_cfg), WORD_BASELINE,
                    train_flops(word_cfg))
        time_word_pair(pair, word_cfg, word_ids, args.steps, args.repeats, args.warmup, device,
                           True if args.bf16 else "auto")
        s = summarize(pair, bound_tokens_per_sec(pair.flops_per_token, best),
                      bound_tokens_per_sec(pair.flops_per_token, best_bf16))
        s["shapes"] = parts
        s["flops_by_part"] = forward_flops(word_cfg)  # one forward pass; training: x3
        _progress(WORD_VARIANT, WORD["batch"], "wlm", s)
        result["word"] = {"data": word_source, "settings": WORD, "training": [s]}

    if not (args.skip_extras or args.word_only):
        num_chars = 20 if args.quick else 200
        result["inference"] = {}
        for name, cfg in configs.items():
            result["inference"][name] = inference_speeds(cfg, val_ids, vocab, num_chars,
                                                         0.1 if args.quick else 1.0, device)
            print(f"{name:>12}: {result['inference'][name]}", flush=True)
        fastest = max(pairs, key=lambda p: p["ours"]["median"])["variant"]
        result["settings"]["tracking_variant"] = fastest  # the largest share tracking can take
        with tempfile.TemporaryDirectory(prefix="rnnlab-bench-") as tmp:
            result["tracking"] = tracking_share(
                configs[fastest], train_ids, Path(tmp), params.train.epochs,
                params.train.batch_size, params.train.num_steps, device)
            print(f"tracking: {result['tracking']}", flush=True)
        if not args.skip_dvc:
            with tempfile.TemporaryDirectory(prefix="rnnlab-bench-") as tmp:
                result["dvc"] = noop_repro_seconds(Path(tmp))
                print(f"dvc: {result['dvc']}", flush=True)
    return result


def write(result: dict, out_dir: Path) -> Path:
    """metrics/bench/<machine kind>.md and .json, one report per kind of machine (the last full
    run on it); a run with other settings than `make bench`'s writes <kind>-partial.*.
    Returns the .md path."""
    m = result["machine"]
    stem = m["kind"] + ("" if result.get("full") else "-partial")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(result))
    return md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", help="names in params.yaml (default: all)")
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 512],
                        help="the char-level rows' batch sizes (the word rows': 20)")
    parser.add_argument("--steps", type=int, default=20, help="minibatches per side per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed minibatches per side")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when present, else the CPU (as train.device)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 steps x 2 repeats, 1 warm-up, batch 32 (the word "
                             "rows 20), short extras")
    parser.add_argument("--skip-extras", action="store_true",
                        help="training only: no generation, evaluation, tracking, dvc")
    parser.add_argument("--skip-dvc", action="store_true", help="no no-op `dvc repro` timing")
    words = parser.add_mutually_exclusive_group()
    words.add_argument("--word-only", action="store_true",
                       help="only the word rows: no char-level rows, no extras")
    words.add_argument("--skip-word", action="store_true", help="no word rows")
    parser.add_argument("--ptb", type=Path, metavar="ZIP",
                        help="the word rows' tokens: a zip holding ptb/ptb.train.txt "
                             "(default: a synthetic Zipf stream over 10,000 ids)")
    parser.add_argument("--bf16", action="store_true",
                        help="time ours under bfloat16 autocast on every row, on any CPU (without "
                             "it: the rows where train.bf16: auto picks it)")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    settings = ("variants", "batches", "steps", "repeats", "warmup", "threads", "device", "quick",
                "word_only", "skip_word")
    args.full = all(getattr(args, k) == parser.get_default(k) for k in settings)
    if args.word_only and args.variants:
        parser.error("--word-only runs no char-level variant: drop --variants")
    if args.ptb is not None and not args.ptb.is_file():
        parser.error(f"--ptb {args.ptb}: no such file")
    if args.quick:
        given = set(args.argv)
        if "--steps" not in given:
            args.steps = 2
        if "--repeats" not in given:
            args.repeats = 2
        if "--warmup" not in given:
            args.warmup = 1
        if "--batches" not in given:
            args.batches = [32]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)
    path = write(result, args.out)
    print()
    print(path.read_text())
    print(f"written: {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
