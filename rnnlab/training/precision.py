"""Which precision trains a model: float32, or bfloat16 autocast of its products (train.bf16).

    false  float32 throughout
    true   every training step and every score under bfloat16 autocast
    auto   (the default) each stack trains in whichever of the two ran its first minibatch faster
           here, where the device multiplies bfloat16 in hardware (a CUDA GPU that supports it, a
           CPU with AMX or AVX512-BF16); float32 elsewhere, without measuring. Scores (validation,
           test) stay float32.

bfloat16 pays or not by model, not by machine: on one AMD EPYC with AVX512-BF16 it trained the
lstm 1.7x faster and the gru 0.5x (nn.GRU's oneDNN path against the compiled float32 loop).
So `auto` is a measured decision like the kernels' (rnnlab/kernels/choice.py, kind `precision`):
one forward and backward of the whole model on the real first minibatch each way, cached per
machine and shape, listed in the run's tags and `rnnlab kernels`, forced by
RNNLAB_PRECISION=float32|bfloat16. The weights and the optimizer stay float32 either way.
"""

from __future__ import annotations

import functools

import torch

from rnnlab.kernels import choice
from rnnlab.models.dispatch import State
from rnnlab.models.lm import RNNLM

CANDIDATES = ("float32", "bfloat16")  # the reference first


def bf16_hardware(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA GPU that supports it, a CPU with
    AMX or AVX512-BF16. Elsewhere oneDNN emulates it: 10x slower than float32 for rnn and gru on
    an AMD EPYC with AVX2 (docs/benchmark.md), so `auto` does not even measure there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def scoring_bf16(setting: bool | str) -> bool:
    """Whether perplexities are computed under bfloat16 autocast: only with train.bf16: true.
    Under auto the held-out numbers are float32's, whatever trained faster."""
    return setting is True


def training_bf16(setting: bool | str, model: RNNLM, x: torch.Tensor, y: torch.Tensor,
                  state: State | None = None) -> bool:
    """Whether `model` trains under bfloat16 autocast: train.bf16 true or false as set; auto,
    whichever precision ran one step on the first minibatch (x, y: (batch, steps)) faster here."""
    if setting != "auto":
        bf16 = bool(setting)
    elif not bf16_hardware(x.device):
        return False
    else:
        bf16 = choice.choose("precision", key(model, x), {
            name: functools.partial(_step, model, x, y, state, name == "bfloat16")
            for name in CANDIDATES}) == "bfloat16"
    if bf16:
        warm_up(model, x, y, state)
    return bf16


def warm_up(model: RNNLM, x: torch.Tensor, y: torch.Tensor, state: State | None = None) -> None:
    """One untimed bfloat16 step before training, its randomness undone. oneDNN's bfloat16 LSTM
    computes a process's first step in other digits than its later ones (measured: a 2-layer lstm
    with dropout, torch 2.13 on an AMD EPYC with AVX512-BF16, trained to another first-epoch
    perplexity after one bfloat16 pass than without, and to the same after one as after three).
    Without this, a run that measured the precision (several bfloat16 passes) and a run that read
    the decision from the cache (none) would train to different numbers, and a resumed epoch
    would not repeat its first run's."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        _step(model, x, y, state, True)


def key(model: RNNLM, x: torch.Tensor) -> str:
    """The shape a precision decision holds for: model and minibatch (and the GPU, on one)."""
    c = model.config
    where = f", on {torch.cuda.get_device_name(x.device)}" if x.device.type == "cuda" else ""
    return (f"{c.cell} {c.impl}: {c.num_layers} layer(s) x {c.hidden_size}, "
            f"{f'embedding {c.embed_size}' if c.embed_size else 'one-hot input'}, "
            f"vocabulary {c.vocab_size}, {x.shape[1]} steps x batch {x.shape[0]}{where}")


def _step(model: RNNLM, x: torch.Tensor, y: torch.Tensor, state: State | None, bf16: bool) -> None:
    """One forward and backward of `model` on (x, y), in bfloat16 autocast or not, leaving every
    parameter's .grad as it was: what `training_bf16` times."""
    with torch.enable_grad():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            total, _ = model.loss(x, y, state)
        torch.autograd.grad(total, [p for p in model.parameters() if p.requires_grad])
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
