"""The two sides of every benchmark row: the book's model and step (or word_language_model's) and
ours, with the settings both train with (BOOK, WORD)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bench.lib.baselines import BookScratchRNN, book_model
from rnnlab.models.dispatch import detach_state
from rnnlab.models.lm import ModelConfig
from rnnlab.training import loop as training

BOOK = {"num_steps": 35, "lr": 1.0, "clip_theta": 1.0, "hidden_size": 256}  # d2l 8.5-9.3


# Zaremba et al. 2014's small LSTM (no dropout), as word_language_model's main.py trains it:
# `--emsize 200 --nhid 200 --nlayers 2 --batch_size 20 --bptt 20 --lr 20 --clip 0.25 --dropout 0`
WORD = {"vocab_size": 10_000, "embed_size": 200, "hidden_size": 200, "num_layers": 2,
        "batch": 20, "num_steps": 20, "lr": 20.0, "clip_theta": 0.25}


WORD_VARIANT = "word lstm"  # the word rows' name in the table


WORD_BASELINE = "wlm RNNModel(LSTM)"


StepFn = Callable[[torch.Tensor, torch.Tensor], object]


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


def word_config(vocab_size: int) -> ModelConfig:
    """Our model of the word rows: WORD's LSTM over `vocab_size` words."""
    return ModelConfig(vocab_size=vocab_size, cell="lstm", impl="torch",
                       num_layers=WORD["num_layers"], hidden_size=WORD["hidden_size"],
                       embed_size=WORD["embed_size"])
