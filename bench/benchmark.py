"""The benchmark: our training step against the book's, interleaved in one process, and the rest.

    python -m bench.benchmark                         # default variants, batch 32 and 512, words
    python -m bench.benchmark --quick                 # a smoke run: few steps, tiny extras
    python -m bench.benchmark --variants rnn gru --batches 32 --steps 20 --repeats 5
    python -m bench.benchmark --word-only --ptb /work/shared/corpora/ptb.zip   # words alone

For every variant of params.yaml (or --variants) and every batch size, both sides train on the
same Time Machine minibatches (characters, 35 steps, SGD lr 1, clipping at norm 1, 256 hidden
units, the state carried across minibatches as the book does):

    book   bench/baselines.py: d2l's RNNModel (one-hot into nn.RNN/GRU/LSTM) or its scratch RNN,
           trained by the body of d2l's train_epoch_ch8
    ours   rnnlab.models.build_model + the training step of rnnlab/training.py

and at word level, Zaremba et al.'s small LSTM as PyTorch's word_language_model example trains it
(2 layers of 200, embedding 200, vocabulary 10,000, batch 20, 20 steps, SGD lr 20, clipping at
0.25, no dropout, the state carried), on Penn Treebank's training words (`--ptb` a zip holding
ptb/ptb.train.txt) or else on a synthetic stream of 10,000 ids drawn by Zipf's law:

    wlm    bench/wlm.py: the example's RNNModel (Embedding, nn.LSTM, Linear, log_softmax) and the
           body of its train() (NLLLoss, clip_grad_norm_, p.data.add_), on its time-major batches
    ours   the same, the same tokens laid out batch-major

Each repeat times `--steps` minibatches of one side, then of the other (the order alternates), so
whatever else the machine does slows both alike; the ratio is the median of the repeats' ratios.
The FLOP bound of a row is its FLOPs per token (bench/flops.py) at the float32 matmul rate this
machine reaches on the row's recurrent product, (batch x H) @ (H x gates*H), measured at start-up
with torch.mm (MKL) and with oneDNN, the faster of the two; `% peak` uses the rate of a large
product instead. A word row's bound adds up the time of each part at the rate of its own product
(the head's, (steps*batch x H) @ (H x vocab), is three quarters of the FLOPs). Also measured, once
per run: generation and evaluation speed, a no-op `dvc repro`, and the share of a training run
spent in MLflow tracking.

Our side runs what a training run would run on this machine: the layer path and the product
libraries that rnnlab/kernels.py measures fastest at first use, measured afresh for the benchmark
(the cache neither read nor written) and listed in the report with their timings. The report names the CPU, its
ISA flags, PyTorch's ISA level and the ISA oneDNN dispatches to. Where the CPU multiplies bfloat16
in hardware (AMX, AVX512-BF16), or with --bf16, it also times the lstm under bfloat16 autocast.

Writes metrics/bench/<machine kind>.md (the tables) and .json (every number), e.g.
amd-epyc-avx2.md: one report per kind of CPU, the last full run on it; other settings than the
defaults write <kind>-partial.*. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.baselines import BookScratchRNN, book_model, book_step  # noqa: E402
from bench.clone import ROOT, tiny_clone  # noqa: E402
from bench.flops import (GATES, bound_by_part, bound_tokens_per_sec, forward_flops,  # noqa: E402
                         train_flops)
from bench.wlm import WordLM, batchify, get_batch, wlm_step  # noqa: E402
from rnnlab import kernels, training  # noqa: E402
from rnnlab.batches import sequential_batches  # noqa: E402
from rnnlab.config import Data, Tokenize, load_params, resolve_train  # noqa: E402
from rnnlab.corpora import BUILTIN  # noqa: E402
from rnnlab.corpus import tokenize_corpus  # noqa: E402
from rnnlab.models import ModelConfig, build_model, detach_state, model_config  # noqa: E402

BOOK = {"num_steps": 35, "lr": 1.0, "clip_theta": 1.0, "hidden_size": 256}  # d2l 8.5-9.3
# Zaremba et al. 2014's small LSTM (no dropout), as word_language_model's main.py trains it:
# `--emsize 200 --nhid 200 --nlayers 2 --batch_size 20 --bptt 20 --lr 20 --clip 0.25 --dropout 0`
WORD = {"vocab_size": 10_000, "embed_size": 200, "hidden_size": 200, "num_layers": 2,
        "batch": 20, "num_steps": 20, "lr": 20.0, "clip_theta": 0.25}
WORD_VARIANT = "word lstm"  # the word rows' name in the table
WORD_BASELINE = "wlm RNNModel(LSTM)"
StepFn = Callable[[torch.Tensor, torch.Tensor], object]


# --- the training step of each side ---------------------------------------------------------------


def ours_step(model: nn.Module, lr: float, clip_theta: float, bf16: bool = False) -> StepFn:
    """Our training step with the state carried (sequential sampling), as run_epochs runs it:
    losses and gradient norms kept as tensors, the losses looked at every 25 steps (one host
    sync per 25); bf16: under bfloat16 autocast (train.bf16)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    h, window, norms = None, [], []

    def step(x, y):
        nonlocal h, window
        h = detach_state(h) if h is not None else None  # detach: truncate BPTT
        h, loss, norm = training.train_step(model, x, y, h, opt, clip_theta, bf16)
        window.append(loss)
        norms.append(norm)
        if len(norms) % 25 == 0:
            if not torch.isfinite(torch.stack(window)).all():
                raise RuntimeError("the benchmark's training diverged")
            window = []

    return step


# --- the data -------------------------------------------------------------------------------------


def time_machine(tok: Tokenize) -> tuple[torch.Tensor, torch.Tensor, object]:
    """The training and validation ids of The Time Machine (the whole bundled text, tokenized as
    params.yaml's `tokenize` says) and its vocabulary."""
    text = BUILTIN["timemachine"].bundled_path().read_text(encoding="utf-8")
    book = Data(corpus="timemachine", source=None, sha1=None, max_tokens=None)
    tokens = tokenize_corpus(text, book, tok)
    return (torch.as_tensor(tokens.splits["train"]), torch.as_tensor(tokens.splits["val"]),
            tokens.vocab)


def minibatches(ids: torch.Tensor, batch_size: int, num_steps: int, count: int,
                device: torch.device = torch.device("cpu"), seed: int = 0):
    """`count` sequential minibatches (x, y), epoch after epoch, made in advance on `device`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < count:
        out.extend(sequential_batches(ids, batch_size, num_steps, gen))
    return [(x.to(device).contiguous(), y.to(device).contiguous()) for x, y in out[:count]]


def ptb_ids(path: Path) -> torch.Tensor:
    """The words of ptb/ptb.train.txt in the zip at `path`, "<eos>" after every line, numbered by
    frequency (0 the most frequent; ties in order of first appearance)."""
    member = "ptb/ptb.train.txt"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if member not in names:
            raise SystemExit(f"--ptb {path}: no {member} in it (it holds "
                             f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''})")
        text = z.read(member).decode("utf-8")
    words = [w for line in text.splitlines() for w in (*line.split(), "<eos>")]
    number = {w: i for i, (w, _) in enumerate(Counter(words).most_common())}
    return torch.tensor([number[w] for w in words])


def zipf_ids(n: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """`n` ids drawn independently with P(k) proportional to 1 / (k + 1), Zipf's law, which word
    frequencies roughly follow: a stand-in for a corpus (the speed of a step does not depend on
    which words it sees). The same ids for the same arguments."""
    weights = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def word_minibatches(ids: torch.Tensor, batch_size: int, num_steps: int, count: int,
                     device: torch.device = torch.device("cpu")):
    """`count` minibatches of the word rows, epoch after epoch, made in advance on `device`, in the
    layout of each side: wlm's (data (steps, batch), targets (steps * batch,)) from its batchify
    and get_batch, and ours (x, y), each (batch, steps), the same tokens transposed. Only full
    chunks of `num_steps` (get_batch makes the last one shorter)."""
    source = batchify(ids, batch_size).to(device)  # (len(ids) // batch, batch)
    starts = range(0, len(source) - num_steps, num_steps)
    if not starts:
        raise SystemExit(f"{len(ids)} tokens make no minibatch of {batch_size} x {num_steps}")
    wlm, ours = [], []
    for k in range(count):
        data, targets = get_batch(source, starts[k % len(starts)], num_steps)
        wlm.append((data, targets))
        ours.append((data.t().contiguous(), targets.view(num_steps, batch_size).t().contiguous()))
    return wlm, ours


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


# --- the machine's matmul rate --------------------------------------------------------------------


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


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def matmul_rates(shapes: list[tuple[int, int, int]], min_seconds: float,
                 device: torch.device = torch.device("cpu")) -> list[dict]:
    """float32 GFLOP/s of (m x k) @ (k x n) through torch.mm (MKL on the CPU) and, on the CPU,
    through oneDNN."""
    rows = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        flops = 2 * m * k * n
        row = {"m": m, "k": k, "n": n,
               "mkl": flops / _seconds_per_call(lambda: torch.mm(a, b), min_seconds, device) / 1e9}
        if device.type == "cpu" and onednn_available():
            w, lin = b.t().contiguous(), torch.ops.mkldnn._linear_pointwise
            row["onednn"] = flops / _seconds_per_call(
                lambda: lin(a, w, None, "none", [], ""), min_seconds) / 1e9
        row["best"] = max(row["mkl"], row.get("onednn", 0.0))
        rows.append(row)
    return rows


# --- training speed -------------------------------------------------------------------------------


@dataclass
class Pair:
    """One variant at one batch size: both sides' tokens/s per repeat."""

    variant: str
    batch: int
    config: dict
    baseline: str  # the baseline's name in the table
    flops_per_token: int  # the model's (no one-hot product), training: forward + backward
    book: list[float] = field(default_factory=list)  # the baseline: the book's code, or wlm's
    ours: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Median of the repeats' ratios: each repeat's two timings saw the same machine."""
        return statistics.median(o / b for o, b in zip(self.ours, self.book))


def baseline_name(cfg: ModelConfig) -> str:
    if cfg.impl == "scratch" and cfg.cell == "rnn":
        return "d2l 8.5 scratch rnn()"
    return f"d2l RNNModel(nn.{ {'rnn': 'RNN', 'gru': 'GRU', 'lstm': 'LSTM'}[cfg.cell] })"


def baseline_for(cfg: ModelConfig, device: torch.device = torch.device("cpu")):
    """The book's model closest to `cfg`: its scratch RNN, or RNNModel around nn.RNN/GRU/LSTM
    (also for the scratch gru and lstm, which the book trains the same way)."""
    if cfg.impl == "scratch" and cfg.cell == "rnn":
        return BookScratchRNN(cfg.vocab_size, cfg.hidden_size, device)
    return book_model(cfg.cell, cfg.vocab_size, cfg.hidden_size, cfg.num_layers).to(device)


def interleave(pair: Pair, sides: dict[str, tuple[StepFn, list]], tokens_per_batch: int,
               steps: int, repeats: int, warmup: int,
               device: torch.device = torch.device("cpu")) -> None:
    """Warm both sides up, then alternate `steps` minibatches of each, `repeats` times, the order
    swapped every repeat; tokens/s into `pair`. `sides`: "book" and "ours", each its step and its
    `warmup + steps * repeats` minibatches."""
    for step, batches in sides.values():
        for x, y in batches[:warmup]:
            step(x, y)
    synchronize(device)
    for r in range(repeats):
        for side in (("book", "ours") if r % 2 == 0 else ("ours", "book")):
            step, batches = sides[side]
            t0 = time.perf_counter()
            for x, y in batches[warmup + r * steps : warmup + (r + 1) * steps]:
                step(x, y)
            synchronize(device)
            getattr(pair, side).append(steps * tokens_per_batch / (time.perf_counter() - t0))


def time_pair(pair: Pair, cfg: ModelConfig, ids: torch.Tensor, steps: int, repeats: int,
              warmup: int, device: torch.device = torch.device("cpu")) -> None:
    """The book's step against ours on the same minibatches; tokens/s into `pair`."""
    batches = minibatches(ids, pair.batch, BOOK["num_steps"], warmup + steps * repeats, device)
    torch.manual_seed(0)
    book_net = baseline_for(cfg, device)
    torch.manual_seed(0)
    sides = {"book": (book_step(book_net, BOOK["lr"], BOOK["clip_theta"]), batches),
             "ours": (ours_step(build_model(cfg).to(device), BOOK["lr"], BOOK["clip_theta"]),
                      batches)}
    interleave(pair, sides, pair.batch * BOOK["num_steps"], steps, repeats, warmup, device)


def time_bf16(cfg: ModelConfig, ids: torch.Tensor, batch: int, steps: int, repeats: int,
              warmup: int) -> dict:
    """Our step in float32 against itself under bfloat16 autocast (train.bf16), same batches."""
    pair = Pair(cfg.cell, batch, asdict(cfg), "float32", train_flops(cfg))
    batches = minibatches(ids, batch, BOOK["num_steps"], warmup + steps * repeats)
    sides = {}
    for side, bf16 in (("book", False), ("ours", True)):
        torch.manual_seed(0)
        sides[side] = (ours_step(build_model(cfg), BOOK["lr"], BOOK["clip_theta"], bf16), batches)
    interleave(pair, sides, batch * BOOK["num_steps"], steps, repeats, warmup)
    return {"variant": pair.variant, "batch": batch, "float32": statistics.median(pair.book),
            "bfloat16": statistics.median(pair.ours), "ratio": pair.ratio}


def word_config(vocab_size: int) -> ModelConfig:
    """Our model of the word rows: WORD's LSTM over `vocab_size` words."""
    return ModelConfig(vocab_size=vocab_size, cell="lstm", impl="torch",
                       num_layers=WORD["num_layers"], hidden_size=WORD["hidden_size"],
                       embed_size=WORD["embed_size"])


def time_word_pair(pair: Pair, cfg: ModelConfig, ids: torch.Tensor, steps: int, repeats: int,
                   warmup: int, device: torch.device = torch.device("cpu")) -> None:
    """wlm's step against ours on the same tokens, each in its own layout; tokens/s into `pair`."""
    wlm_batches, our_batches = word_minibatches(ids, pair.batch, WORD["num_steps"],
                                                warmup + steps * repeats, device)
    lr, clip = WORD["lr"], WORD["clip_theta"]
    torch.manual_seed(0)
    wlm = WordLM(cfg.vocab_size, cfg.embed_size, cfg.hidden_size, cfg.num_layers, dropout=0.0)
    torch.manual_seed(0)
    sides = {"book": (wlm_step(wlm.to(device), lr, clip), wlm_batches),
             "ours": (ours_step(build_model(cfg).to(device), lr, clip), our_batches)}
    interleave(pair, sides, pair.batch * WORD["num_steps"], steps, repeats, warmup, device)


# --- generation, evaluation -----------------------------------------------------------------------


def inference_speeds(cfg: ModelConfig, val_ids: torch.Tensor, vocab, num_chars: int,
                     min_seconds: float, device: torch.device = torch.device("cpu")) -> dict:
    """Characters/s of greedy and sampled continuation; tokens/s of `perplexity`."""
    from rnnlab.sampling import continue_text

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


# --- a no-op `dvc repro` --------------------------------------------------------------------------


def noop_repro_seconds(work: Path) -> dict:
    """Seconds of `dvc repro` when nothing changed: in a git clone of HEAD with tiny params,
    the first repro runs every stage, the second (timed) should find nothing to do."""
    repo, env, dvc = tiny_clone(work)

    def repro() -> tuple[float, str]:
        t0 = time.perf_counter()
        proc = subprocess.run([dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"dvc repro failed in {repo}:\n{proc.stdout}\n{proc.stderr}")
        return seconds, proc.stdout

    first, _ = repro()
    second, out = repro()
    return {"first_repro_seconds": first, "noop_repro_seconds": second,
            "noop_ran_a_stage": "Running stage" in out}


# --- tracking -------------------------------------------------------------------------------------


def tracking_share(cfg: ModelConfig, ids: torch.Tensor, work: Path, epochs: int, batch: int,
                   num_steps: int, device: torch.device = torch.device("cpu")) -> dict:
    """Seconds of the tracking calls a training run makes (record_curves each epoch, then
    record_summary) with a real MLflow run in a local SQLite store (made by an earlier run, as in
    the pipeline), against the time of an epoch of the same model at these settings (batches per
    epoch x the measured seconds per minibatch; the optimizer is SGD, the pipeline's Adam costs a
    little more)."""
    from rnnlab.batches import num_batches
    from rnnlab.config import Tracking
    from rnnlab.records import record_curves, record_summary
    from rnnlab.tracking import tracked_run

    torch.manual_seed(0)
    step = ours_step(build_model(cfg).to(device), 1.0, 1.0)
    batches = minibatches(ids, batch, num_steps, 12, device)
    for x, y in batches[:2]:
        step(x, y)
    synchronize(device)
    t0 = time.perf_counter()
    for x, y in batches[2:]:
        step(x, y)
    synchronize(device)
    step_seconds = (time.perf_counter() - t0) / (len(batches) - 2)
    per_epoch = num_batches(len(ids), batch, num_steps)
    epoch_seconds = per_epoch * step_seconds

    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    history, curves = [], []
    tracking = Tracking(enabled=True, experiment="bench", patience=0, register=None)
    try:
        with tracked_run(tracking, "bench", "bench-setup", {}):
            pass  # creates the store and the experiment, as the pipeline's first run does
        t0 = time.perf_counter()
        with tracked_run(tracking, "bench", "bench", {}) as tracker:
            started = time.perf_counter() - t0
            for epoch in range(1, epochs + 1):
                history.append({"epoch": epoch, "train_ppl": 10.0 / epoch, "val_ppl": 11.0 / epoch,
                                "tokens_per_sec": 1e5, "grad_norm": 0.5, "clipped_frac": 0.1,
                                "lr": 1.0, "seconds": epoch_seconds})
                t1 = time.perf_counter()
                record_curves(work / "curves.csv", history, tracker)
                curves.append(time.perf_counter() - t1)
            t1 = time.perf_counter()
            record_summary(work / "train.json", {"best_epoch": epochs, "best_val_ppl": 1.0,
                                                 "epochs": epochs, "device": str(device)}, tracker)
            summary = time.perf_counter() - t1
            t1 = time.perf_counter()
        ended = time.perf_counter() - t1
    finally:
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    recorded = sum(curves) + summary
    train_seconds = epochs * epoch_seconds
    return {
        "epoch_seconds": epoch_seconds, "batches_per_epoch": per_epoch, "epochs": epochs,
        "run_start_seconds": started, "run_end_seconds": ended,
        "record_curves_seconds_median": statistics.median(curves),
        "record_summary_seconds": summary,
        "share_of_training": recorded / train_seconds,
        "share_with_run_start_and_end": (recorded + started + ended) / train_seconds,
    }


# --- the report -----------------------------------------------------------------------------------


# ISA flags that decide which code is fast (as /proc/cpuinfo names them; macOS: none listed)
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_bf16", "asimd", "sve")


def cpu_flags() -> list[str]:
    """The ISA_FLAGS this CPU lists, in that order."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in ISA_FLAGS if f in flags]


def onednn_isa() -> str:
    """The ISA oneDNN dispatches to here, as its verbose log names it (a child process: the
    log is read once, at start-up)."""
    code = ("import torch; x = torch.randn(4, 8); w = torch.randn(8, 8); "
            "torch.ops.mkldnn._linear_pointwise(x, w, None, 'none', [], '')")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "ONEDNN_VERBOSE": "1"}, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in proc.stdout.splitlines():
        if ",isa:" in line:
            return line.split(",isa:", 1)[1].strip()
    return "unknown"


def machine_kind(cpu: str, flags: list[str]) -> str:
    """A file name for the kind of machine: its CPU model and the ISA that sets its speed, e.g.
    amd-epyc-avx2 or intel-xeon-platinum-8480c-avx512-amx."""
    isa = torch.backends.cpu.get_cpu_capability().lower().replace("_", "-")
    extra = "-amx" if "amx_tile" in flags else "-bf16" if "avx512_bf16" in flags else ""
    slug = "".join(c if c.isalnum() else "-" for c in cpu.lower().replace("(r)", "").replace("(tm)", ""))
    return "-".join(part for part in slug.split("-") if part) + f"-{isa}{extra}"


def machine() -> dict:
    cpu, flags = kernels.cpu_model(), cpu_flags()

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else "unknown"

    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "flags": flags, "kind": machine_kind(cpu, flags),
            "torch_isa": torch.backends.cpu.get_cpu_capability(),
            "onednn_isa": onednn_isa() if onednn_available() else "none",
            "load_average": os.getloadavg()[0],  # other work on the machine: 0 is quiet
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onednn": onednn_available(), "python": platform.python_version(),
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


TABLE_COLUMNS = ("variant", "batch", "code", "tok/s", "min", "max", "ratio", "FLOPs/token",
                 "bound tok/s", "% bound", "% peak")


def _k(x: float) -> str:
    return f"{x / 1e3:,.1f}k"


def _training_rows(pairs: list[dict]) -> list[str]:
    rows = []
    for p in pairs:
        for side in ("book", "ours"):
            s = p[side]
            cells = [p["variant"], p["batch"], "ours" if side == "ours" else p["baseline"],
                     _k(s["median"]), _k(s["min"]), _k(s["max"]),
                     f"{p['ratio'] if side == 'ours' else 1.0:.2f}x", f"{p['flops_per_token']:,}",
                     _k(p["bound"]), f"{s['median'] / p['bound']:.0%}",
                     f"{s['median'] / p['peak_bound']:.0%}"]
            rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


def markdown(result: dict) -> str:
    """The report: the training table, the matmul rates, and the extras that were measured."""
    m, settings = result["machine"], result["settings"]
    on = "" if m["device"] == "cpu" else f", on {m['device']}"
    lines = [
        f"# Benchmark {result['date']}: {m['cpu']}, {m['threads']} thread(s){on}",
        "",
        f"CPU flags: {' '.join(m.get('flags', [])) or 'none of ' + ', '.join(ISA_FLAGS)}; "
        f"PyTorch's ISA level {m.get('torch_isa', '?')}; oneDNN's ISA: {m.get('onednn_isa', '?')}",
        "",
        f"host {m['host']}, commit {m['commit']}{' (dirty)' if m['dirty'] else ''}, torch "
        f"{m['torch']}, oneDNN {'yes' if m['onednn'] else 'no'}; load average "
        f"{m.get('load_average_before', float('nan')):.1f} before, {m['load_average']:.1f} after "
        f"(other work on the machine; {m['cores']} cores); command: `{result['command']}`",
    ]
    header = ["| " + " | ".join(TABLE_COLUMNS) + " |",
              "|---|---:|---|" + "---:|" * (len(TABLE_COLUMNS) - 3)]
    if result["training"]:
        lines += [
            "",
            f"Training: {settings['steps']} minibatches x {settings['repeats']} repeats per side, "
            f"{BOOK['num_steps']} steps, SGD lr {BOOK['lr']:g}, clip {BOOK['clip_theta']:g}, The "
            f"Time Machine characters (vocab {result['vocab_size']}). tok/s: median (min-max) of "
            "the repeats; ratio: median of the repeats' ours/book; bound: FLOPs/token at the best "
            "float32 matmul rate of the row's recurrent product; peak: at the large product's "
            "rate.",
            "", *header, *_training_rows(result["training"])]
    if result.get("word"):
        w, (p,) = result["word"]["settings"], result["word"]["training"]
        parts = ", ".join(f"{part} {rows} x {k} @ {k} x {n}"
                          for part, (rows, k, n) in p["shapes"].items())
        lines += [
            "",
            f"Words: {settings['steps']} minibatches x {settings['repeats']} repeats per side of "
            f"Zaremba et al.'s small LSTM ({w['num_layers']} layers of {w['hidden_size']}, "
            f"embedding {w['embed_size']}, vocab {p['config']['vocab_size']:,}, no dropout), batch "
            f"{w['batch']}, {w['num_steps']} steps, SGD lr {w['lr']:g}, clip {w['clip_theta']:g}, "
            f"on {result['word']['data']}; wlm: pytorch/examples word_language_model "
            "(bench/wlm.py). tok/s: median (min-max) of the repeats; ratio: median of the repeats' "
            "ours/wlm; bound: each part's FLOPs at the best float32 rate of its own product "
            f"({parts}), the parts' times added; peak: all at the large product's rate.",
            "", *header, *_training_rows(result["word"]["training"])]
    lines += [
        "",
        "float32 matmul rates (GFLOP/s, median of 5 rounds):",
        "",
        "| m x k @ k x n | torch.mm (MKL) | oneDNN | best |",
        "|---|---:|---:|---:|",
    ]
    for r in result["matmul"]:
        lines.append(f"| {r['m']} x {r['k']} @ {r['k']} x {r['n']} | {r['mkl']:.0f} | "
                     f"{r.get('onednn', float('nan')):.0f} | {r['best']:.0f} |")
    if result.get("kernels"):
        lines += ["", "What ran (rnnlab/kernels.py: measured here at first use, then cached; "
                      "against the reference, times faster):", ""]
        lines += [f"- {line}" for line in result["kernels"]]
    if result.get("bf16"):
        b = result["bf16"]
        lines += ["", f"bfloat16 autocast (train.bf16), ours {b['variant']} at batch {b['batch']}: "
                      f"{_k(b['bfloat16'])} tok/s against {_k(b['float32'])} in float32, "
                      f"{b['ratio']:.2f}x."]
    if result.get("inference"):
        lines += ["", "Generation (after `time traveller`), evaluation (`perplexity`, batch 1):",
                  "", "| variant | greedy chars/s | sampled chars/s | eval tok/s |",
                  "|---|---:|---:|---:|"]
        for name, s in result["inference"].items():
            lines.append(f"| {name} | {s['greedy_chars_per_sec']:,.0f} | "
                         f"{s['sampled_chars_per_sec']:,.0f} | {_k(s['eval_tokens_per_sec'])} |")
    if result.get("dvc"):
        d = result["dvc"]
        warning = "; WARNING: the second run ran a stage" if d["noop_ran_a_stage"] else ""
        lines += ["", f"No-op `dvc repro`: {d['noop_repro_seconds']:.2f} s (the first, running "
                      f"every stage with tiny params: {d['first_repro_seconds']:.1f} s{warning})."]
    if result.get("tracking"):
        t = result["tracking"]
        lines += ["", f"Tracking: record_curves {t['record_curves_seconds_median'] * 1e3:.1f} ms "
                      f"per epoch (median), record_summary {t['record_summary_seconds'] * 1e3:.1f} "
                      f"ms, against {t['epoch_seconds']:.2f} s per epoch "
                      f"({t['batches_per_epoch']} minibatches of {settings['tracking_variant']}): "
                      f"{t['share_of_training']:.2%} of {t['epochs']} epochs' training time "
                      f"({t['share_with_run_start_and_end']:.2%} with the run's start and end, "
                      f"{t['run_start_seconds']:.2f} s and {t['run_end_seconds']:.2f} s)."]
    return "\n".join(lines) + "\n"


def summarize(pair: Pair, bound: float, peak_bound: float) -> dict:
    """`pair` as the report keeps it: each side's median, min, max, the ratio and the bounds."""
    out = {k: v for k, v in asdict(pair).items() if k not in ("book", "ours")}
    for side in ("book", "ours"):
        values = getattr(pair, side)
        out[side] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                     "repeats": values}
    out["ratio"] = pair.ratio
    out["bound"] = bound
    out["peak_bound"] = peak_bound
    return out


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


def word_data(ptb: Path | None, count: int) -> tuple[torch.Tensor, int, str]:
    """The word rows' tokens (at least `count` minibatches), their vocabulary size, and what they
    are: Penn Treebank's training words from the zip `ptb`, or a synthetic Zipf stream."""
    if ptb is None:
        n = (count + 1) * WORD["num_steps"] * WORD["batch"]
        return (zipf_ids(n, WORD["vocab_size"]), WORD["vocab_size"],
                f"a synthetic Zipf stream ({n:,} ids over {WORD['vocab_size']:,})")
    ids = ptb_ids(ptb)
    vocab_size = int(ids.max()) + 1
    return (ids, vocab_size, f"Penn Treebank's training words ({ptb.name}: {len(ids):,} tokens, "
                             f"{vocab_size:,} words)")


def word_shapes(cfg: ModelConfig, batch: int, num_steps: int) -> dict[str, tuple[int, int, int]]:
    """The product behind each part of `forward_flops`, as (m, k, n): the input projection of
    all steps at once (the first layer's; the others' is the same when embed_size = hidden_size),
    the recurrent product of one step, the head over all steps."""
    width, rows = GATES[cfg.cell] * cfg.hidden_size, batch * num_steps
    return {"input": (rows, cfg.embed_size or cfg.hidden_size, width),
            "recurrent": (batch, cfg.hidden_size, width),
            "output": (rows, cfg.hidden_size, cfg.vocab_size)}


def _progress(name: str, batch: int, baseline: str, s: dict) -> None:
    print(f"{name:>14} batch {batch:>4}: {baseline} {_k(s['book']['median']):>8}  ours "
          f"{_k(s['ours']['median']):>8} tok/s  {s['ratio']:.2f}x  "
          f"{s['ours']['median'] / s['bound']:.0%} of bound", flush=True)


def run(args: argparse.Namespace) -> dict:
    with kernels.afresh():  # this run's own measurements, not the cache's
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
    matmul = matmul_rates(shapes, 0.2 if args.quick else 1.0, device)
    rates = {(r["m"], r["k"], r["n"]): r["best"] * 1e9 for r in matmul}  # FLOP/s
    peak = rates[(big, big, big)]

    pairs = []
    for name, cfg in configs.items():
        for batch in args.batches:
            pair = Pair(name, batch, asdict(cfg), baseline_name(cfg), train_flops(cfg))
            time_pair(pair, cfg, train_ids, args.steps, args.repeats, args.warmup, device)
            rate = rates[(batch, cfg.hidden_size, GATES[cfg.cell] * cfg.hidden_size)]
            s = summarize(pair, bound_tokens_per_sec(pair.flops_per_token, rate),
                          bound_tokens_per_sec(pair.flops_per_token, peak))
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
              "matmul": matmul, "training": pairs, "full": args.full}

    if configs and (args.bf16 or training.bf16_hardware(torch.device("cpu"))) \
            and device.type == "cpu":
        cfg = next((c for c in configs.values() if c.cell == "lstm"), next(iter(configs.values())))
        result["bf16"] = time_bf16(cfg, train_ids, max(args.batches), args.steps, args.repeats,
                                   args.warmup)
        print(f"bf16: {result['bf16']}", flush=True)
    result["kernels"] = kernels.report()

    if not args.skip_word:
        pair = Pair(WORD_VARIANT, WORD["batch"], asdict(word_cfg), WORD_BASELINE,
                    train_flops(word_cfg))
        time_word_pair(pair, word_cfg, word_ids, args.steps, args.repeats, args.warmup, device)
        part_rates = {part: rates[shape] for part, shape in parts.items()}
        s = summarize(pair, bound_by_part(forward_flops(word_cfg), part_rates),
                      bound_tokens_per_sec(pair.flops_per_token, peak))
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
                        help="also time the lstm under bfloat16 autocast where the CPU has no "
                             "AMX or AVX512-BF16 (where it has, always)")
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
