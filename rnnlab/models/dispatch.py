"""The contract every recurrent stack keeps, and which path runs it.

    outputs, state = stack(x, state)   # x: (steps, batch) token ids | (steps, batch, input)
                                       # outputs: (steps, batch, hidden); state: (h,) | (h, c)

Both stacks (rnnlab/models/scratch.py, rnnlab/models/concise.py) can train on the CPU by several
paths that compute the same function: `reference` (nn.RNN / nn.GRU / nn.LSTM, or the scratch
cells' loop over steps), `fused` (rnn and gru: rnnlab/kernels/fused.py) and `native` (compiled:
rnn, gru and the torch impl's lstm, rnnlab/kernels/native.py). Which one trains is measured on
the first minibatch, per machine and shape (`training_path`, rnnlab/kernels/choice.py).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from rnnlab.kernels import choice, native
from rnnlab.kernels.fused import RECURRENCES, fused_applies

# (h,) for rnn and gru, (h, c) for lstm; each (num_layers, batch, hidden)
State = tuple[torch.Tensor, ...]


def detach_state(state: State) -> State:
    """The same values cut from the graph: truncates BPTT between minibatches. (h,) or (h, c)."""
    return tuple(s.detach() for s in state)


def training_paths(cell: str) -> list[str]:
    """The paths that compute a `cell` stack's function on the CPU, the reference first: the
    Python recurrences (rnn, gru) and the compiled ones (rnn, gru, lstm) where they loaded."""
    return (["reference"] + (["fused"] if cell in RECURRENCES else [])
            + (["native"] if cell in native.RECURRENCES and native.load() else []))


def recurrence_of(cell: str, path: str):
    """The autograd Function that runs a `cell` layer's time loop on `path` (fused | native)."""
    if path == "native":
        if not native.load():  # training_paths offers native only where it loaded
            raise RuntimeError(f"rnnlab native: {native.why_not()}")
        return native.RECURRENCES[cell]
    return RECURRENCES[cell]


def training_path(stack: nn.Module, x: torch.Tensor, state: State) -> str:
    """The path `stack` runs x by: on the CPU outside autocast, the one measured fastest for this
    shape (rnnlab/kernels/choice.py), forward and backward while gradients are recorded, the
    forward alone without them (scores, text: another winner, at batch 1 above all);
    `reference` on other devices and under autocast."""
    if not fused_applies(x):
        return "reference"
    paths = stack.paths()
    if len(paths) == 1:
        return paths[0]
    grad = torch.is_grad_enabled()
    p = next(stack.parameters())
    key = (f"{stack.cell} {type(stack).__name__.removesuffix('RNN').lower()}: "
           f"{state[0].shape[0]} layer(s) x {state[0].shape[-1]}, "
           f"{'one-hot' if not x.is_floating_point() else f'{x.shape[-1]}-wide'} input, "
           f"{x.shape[0]} steps x batch {x.shape[1]}, {str(p.dtype)[6:]}"
           f"{'' if grad else ', no gradients'}")
    run = _train_pass if grad else _forward_pass
    return choice.choose("layer", key, {path: functools.partial(run, stack, x, state, path)
                                         for path in paths})


def _forward_pass(stack: nn.Module, x: torch.Tensor, state: State, path: str) -> None:
    """One forward of `stack` by `path` without gradients: what `training_path` times for
    scoring and generation."""
    with torch.no_grad():
        stack.run(x, state, path)


def _train_pass(stack: nn.Module, x: torch.Tensor, state: State, path: str) -> None:
    """One forward and backward of `stack` by `path` on the inputs' shapes, leaving every
    parameter's .grad as it was: what `training_path` times."""
    with torch.enable_grad():
        x = x.detach().requires_grad_() if x.is_floating_point() else x
        state = tuple(s.detach().requires_grad_() for s in state)
        outputs, last = stack.run(x, state, path)
        loss = outputs.sum() + sum(s.sum() for s in last)
        torch.autograd.grad(loss, [*stack.parameters(), *state])
