"""The book's concise implementation (impl `torch`): nn.RNN (tanh) / nn.GRU / nn.LSTM behind
the stack contract of rnnlab/models/dispatch.py. cuDNN runs them on a GPU; on the CPU the same
parameters can also train by the fused and native paths."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from rnnlab.kernels.fused import LAYERS
from rnnlab.models import dispatch
from rnnlab.models.dispatch import State


@functools.cache
def cpu_bf16_runs(module: type[nn.RNNBase]) -> bool:
    """Whether `module` runs under bfloat16 autocast on this CPU. oneDNN's recurrent kernels
    refuse bfloat16 on some CPUs without AVX-512 ("could not create a primitive descriptor for
    the LSTM forward propagation primitive"); there the module runs in float32 instead. Asked
    once per process, with a one-step module."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            module(2, 2)(torch.zeros(1, 1, 2))
        return True
    except RuntimeError:
        return False


class TorchRNN(nn.Module):
    """nn.RNN (tanh) / nn.GRU / nn.LSTM behind the scratch stack's interface.

    Paths (`run`): `reference` runs the nn.* module itself; `fused` (rnn, gru) and `native` (rnn,
    gru, lstm) compute the same function from the same parameters (rnnlab/kernels/fused.py,
    rnnlab/kernels/native.py). `forward` takes the path `training_path` measured fastest on the
    CPU, with gradients and without (the winners differ); the module everywhere else: cuDNN on a
    GPU already runs the whole sequence in one kernel.
    """

    CELLS = {nn.RNN: "rnn", nn.GRU: "gru", nn.LSTM: "lstm"}

    def __init__(self, module: type[nn.RNNBase], input_size: int, hidden_size: int,
                 num_layers: int, dropout: float):
        super().__init__()
        # nn.RNN's dropout acts between layers only (and warns if given with one layer).
        self.rnn = module(input_size, hidden_size, num_layers,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.cell = self.CELLS[module]
        self.num_states = 2 if self.cell == "lstm" else 1  # nn.LSTM carries (h, c)

    def paths(self) -> list[str]:
        """What can train this stack on the CPU, the reference first."""
        return dispatch.training_paths(self.cell)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return self.run(x, state, dispatch.training_path(self, x, state))

    def run(self, x: torch.Tensor, state: State, path: str) -> tuple[torch.Tensor, State]:
        return self.reference(x, state) if path == "reference" else self.fused(x, state, path)

    def reference(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if not x.is_floating_point():  # token ids: one-hot, as the book's concise RNN
            dtype = self.rnn.weight_ih_l0.dtype
            x = F.one_hot(x, self.rnn.input_size).to(dtype)  # (steps, batch, vocab)
        hx = state if self.num_states == 2 else state[0]  # nn.LSTM takes (h, c), the others h
        if (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and not cpu_bf16_runs(type(self.rnn))):
            with torch.autocast("cpu", enabled=False):  # this CPU's oneDNN has no bf16 kernel
                outputs, hx = self.rnn(x.float(), hx)
        else:
            outputs, hx = self.rnn(x, hx)  # (steps, batch, hidden)
        return outputs, hx if isinstance(hx, tuple) else (hx,)

    def fused(self, x: torch.Tensor, state: State, path: str = "fused") -> tuple[torch.Tensor, State]:
        """The nn.* module's function, layer by layer, by the `fused` or `native` path."""
        rnn = self.rnn
        layer_fn, recurrence = LAYERS[self.cell], dispatch.recurrence_of(self.cell, path)
        last = []  # per layer: its last (h,) | (h, c)
        for layer in range(rnn.num_layers):
            w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{name}_l{layer}")
                                      for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            if layer > 0:
                x = F.dropout(x, rnn.dropout, self.training)  # between layers, as nn.RNN
            s = tuple(part[layer] for part in state)  # (batch, hidden) each
            x, s = layer_fn(recurrence, x, s, w_ih, w_hh, b_ih, b_hh)  # x: (steps, batch, hidden)
            last.append(s)
        return x, tuple(torch.stack(parts) for parts in zip(*last))
