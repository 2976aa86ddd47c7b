"""Timing: both sides of a row interleaved in one process (the ratio is the median of the repeats'
ratios), the machine's matmul rates, and generation and evaluation speed."""

from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from bench.lib.baselines import book_step
from bench.lib.book_vs_ours import BOOK, WORD, StepFn, baseline_for, ours_step
from bench.lib.machine import onednn_available
from bench.lib.streams import minibatches, word_minibatches
from bench.lib.wlm import WordLM, wlm_step
from rnnlab.models.lm import ModelConfig, build_model
from rnnlab.training import loop as training
from rnnlab.training.precision import bf16_hardware, training_bf16

# Why a bfloat16 row has no oneDNN rate on a CPU without bfloat16 hardware: oneDNN's linear
# builds no bfloat16 primitive there ("could not create a primitive descriptor"); torch.mm
# still runs, emulated.
NO_BF16_ONEDNN = "no oneDNN bfloat16 linear on a CPU without AVX512-BF16 or AMX"


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work: a timer read before it would time only the queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of handing it back to the system.

    Both sides run in one process, one after the other. With glibc's defaults every switch from
    one side's allocation pattern to the other's trims the heap, and the next minibatches fault
    the pages in again (thousands of page faults per minibatch in a VM), which a training process
    running one model reaches a steady state without. Blocks above 32 MiB stay mmap'ed, as in
    training. True if glibc took the settings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
                and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))


def _seconds_per_call(fn: Callable[[], object], min_seconds: float,
                      device: torch.device = torch.device("cpu")) -> float:
    """Median seconds of one call over 5 rounds of at least `min_seconds / 5` each."""
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(min_seconds / 5 / once))
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        rounds.append((time.perf_counter() - t0) / n)
    return statistics.median(rounds)


def matmul_rates(shapes: list[tuple[int, int, int]], min_seconds: float,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32
                 ) -> list[dict]:
    """GFLOP/s of (m x k) @ (k x n) in `dtype` through torch.mm (MKL on the CPU, oneDNN for
    bfloat16) and, on the CPU, through oneDNN's linear: in bfloat16 only where the CPU has
    bfloat16 hardware; elsewhere the row's "onednn_skipped" says why."""
    onednn = device.type == "cpu" and onednn_available()
    skipped = None
    if onednn and dtype == torch.bfloat16 and not bf16_hardware(device):
        onednn, skipped = False, NO_BF16_ONEDNN
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        flops = 2 * m * k * n
        row = {"m": m, "k": k, "n": n,
               "mkl": flops / _seconds_per_call(lambda: torch.mm(a, b), min_seconds, device) / 1e9}
        if skipped:
            row["onednn_skipped"] = skipped
        if onednn:
            w, lin = b.t().contiguous(), torch.ops.mkldnn._linear_pointwise
            row["onednn"] = flops / _seconds_per_call(
                lambda: lin(a, w, None, "none", [], ""), min_seconds) / 1e9
        row["best"] = max(row["mkl"], row.get("onednn", 0.0))
        rows.append(row)
    return rows


@dataclass
class Pair:
    """One variant at one batch size: both sides' tokens/s per repeat."""

    variant: str
    batch: int
    config: dict
    baseline: str  # the baseline's name in the table
    flops_per_token: int  # the model's (no one-hot product), training: forward + backward
    book: list[float] = field(default_factory=list)  # the baseline: the book's code, or wlm's
    ours: list[float] = field(default_factory=list)  # ours in float32
    ours_bf16: list[float] = field(default_factory=list)  # ours under bfloat16 autocast, where
    #                                                       train.bf16: auto picks it (else empty)

    @property
    def ratio(self) -> float:
        """Median of the repeats' ratios: each repeat's two timings saw the same machine."""
        return statistics.median(o / b for o, b in zip(self.ours, self.book))

    @property
    def ratio_bf16(self) -> float | None:
        """The same for ours under bfloat16 autocast, where auto picks it; else None."""
        return (statistics.median(o / b for o, b in zip(self.ours_bf16, self.book))
                if self.ours_bf16 else None)


def interleave(pair: Pair, sides: dict[str, tuple[StepFn, list]], tokens_per_batch: int,
               steps: int, repeats: int, warmup: int,
               device: torch.device = torch.device("cpu")) -> None:
    """Warm every side up, then alternate `steps` minibatches of each, `repeats` times, the order
    reversed every repeat; tokens/s into `pair`. `sides`: "book", "ours" and perhaps
    "ours_bf16", each its step and its `warmup + steps * repeats` minibatches."""
    for step, batches in sides.values():
        for x, y in batches[:warmup]:
            step(x, y)
    synchronize(device)
    for r in range(repeats):
        for side in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            step, batches = sides[side]
            t0 = time.perf_counter()
            for x, y in batches[warmup + r * steps : warmup + (r + 1) * steps]:
                step(x, y)
            synchronize(device)
            getattr(pair, side).append(steps * tokens_per_batch / (time.perf_counter() - t0))


def our_sides(cfg: ModelConfig, batches: list, lr: float, clip: float, bf16: bool | str,
              device: torch.device) -> dict[str, tuple[StepFn, list]]:
    """Ours in float32 ("ours") and, where `bf16` (train.bf16: auto, or True) picks it for this
    model on the first minibatch, under bfloat16 autocast ("ours_bf16"), each from seed 0."""
    sides = {}
    for side, autocast in (("ours", False), ("ours_bf16", True)):
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        if autocast and not training_bf16(bf16, model, *batches[0]):
            continue  # float32 trains this model faster here: what a run would train in
        sides[side] = (ours_step(model, lr, clip, autocast), batches)
    return sides


def time_pair(pair: Pair, cfg: ModelConfig, ids: torch.Tensor, steps: int, repeats: int,
              warmup: int, device: torch.device = torch.device("cpu"), bf16: bool | str = "auto"
              ) -> None:
    """The book's step against ours on the same minibatches, ours in float32 and, where `bf16`
    (train.bf16: auto, or True) picks it, under bfloat16 autocast too; tokens/s into `pair`."""
    batches = minibatches(ids, pair.batch, BOOK["num_steps"], warmup + steps * repeats, device)
    torch.manual_seed(0)
    book_net = baseline_for(cfg, device)
    sides = {"book": (book_step(book_net, BOOK["lr"], BOOK["clip_theta"]), batches),
             **our_sides(cfg, batches, BOOK["lr"], BOOK["clip_theta"], bf16, device)}
    interleave(pair, sides, pair.batch * BOOK["num_steps"], steps, repeats, warmup, device)


def time_word_pair(pair: Pair, cfg: ModelConfig, ids: torch.Tensor, steps: int, repeats: int,
                   warmup: int, device: torch.device = torch.device("cpu"),
                   bf16: bool | str = "auto") -> None:
    """wlm's step against ours on the same tokens, each in its own layout; tokens/s into `pair`."""
    wlm_batches, our_batches = word_minibatches(ids, pair.batch, WORD["num_steps"],
                                                warmup + steps * repeats, device)
    lr, clip = WORD["lr"], WORD["clip_theta"]
    torch.manual_seed(0)
    wlm = WordLM(cfg.vocab_size, cfg.embed_size, cfg.hidden_size, cfg.num_layers, dropout=0.0)
    sides = {"book": (wlm_step(wlm.to(device), lr, clip), wlm_batches),
             **our_sides(cfg, our_batches, lr, clip, bf16, device)}
    interleave(pair, sides, pair.batch * WORD["num_steps"], steps, repeats, warmup, device)


def inference_speeds(cfg: ModelConfig, val_ids: torch.Tensor, vocab, num_chars: int,
                     min_seconds: float, device: torch.device = torch.device("cpu")) -> dict:
    """Characters/s of greedy and sampled continuation; tokens/s of `perplexity`."""
    from rnnlab.training.sampling import continue_text

    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    gen = torch.Generator().manual_seed(0)
    greedy = _seconds_per_call(lambda: continue_text(model, vocab, "time traveller", num_chars),
                               min_seconds, device)
    sampled = _seconds_per_call(
        lambda: continue_text(model, vocab, "time traveller", num_chars, temperature=0.8, gen=gen),
        min_seconds, device)
    evaluate = _seconds_per_call(lambda: training.perplexity(model, val_ids, device), min_seconds,
                                 device)
    return {"greedy_chars_per_sec": num_chars / greedy,
            "sampled_chars_per_sec": num_chars / sampled,
            "eval_tokens_per_sec": (len(val_ids) - 1) / evaluate}
