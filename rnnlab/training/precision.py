"""Which precision trains a model: float32, or bfloat16 autocast of its products (train.bf16).

    false  float32 throughout
    true   every training step and every score under bfloat16 autocast
    auto   (the default) whichever of the two ran the first minibatch faster, where the device
           multiplies bfloat16 in hardware (`bf16_hardware`); float32 elsewhere. Scores: float32.

Whether bfloat16 pays depends on the model, so `auto` is measured like a kernel (kind `precision`
of rnnlab/kernels/choice.py: cached per machine and shape, in the run's tags, forced by
RNNLAB_PRECISION=float32|bfloat16). The weights and the optimizer stay float32 either way.
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
    AMX or AVX512-BF16. Elsewhere oneDNN emulates it, far slower: `auto` does not measure there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def bf16_note(setting: bool | str, device: torch.device) -> str:
    """train.bf16 on `device` in words, for the line that says what trains ('' for float32)."""
    if setting is True:
        return " (bfloat16 autocast)"
    if setting == "auto" and bf16_hardware(device):
        return " (bfloat16 autocast if it measures faster)"
    return ""


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
    """One untimed bfloat16 step before training, its randomness undone: oneDNN's first bfloat16
    pass in a process computes other digits than later ones, so without it a run that measured
    the precision and one that read it from the cache (or resumed) would train differently."""
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
