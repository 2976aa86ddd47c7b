"""The book's from-scratch implementation (impl `scratch`): explicit parameters, a Python loop
over time steps (d2l 8.5, 9.1, 9.2), behind the stack contract of rnnlab/models/dispatch.py.

Every scratch cell obeys one contract, in two halves:

    terms = cell.input_terms(x)   # x W_x* + b_*, one term per gate, all steps at once (one matmul
                                  # per gate, outside the time loop): (steps, batch, hidden) each
    state = cell(x_t, state)      # one time step; x_t = those terms at step t: (batch, hidden) each

The rnn and gru cells also have `outputs, state = cell.all_steps(terms, state, recurrence)`: the
same function over every step as one autograd op (the torch impl's fused or native path on the
scratch parameters), run on the CPU outside autocast where it measured faster than the loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnnlab.kernels.fused import RECURRENCES
from rnnlab.models import dispatch
from rnnlab.models.dispatch import State

# Shapes follow the book: row vectors, x (batch, input) @ W_x* (input, hidden), h (batch, hidden)
# @ W_h* (hidden, hidden). One bias per gate where nn.RNN/GRU/LSTM have two (b_ih + b_hh): their sum
# is the same function. Initialisation is PyTorch's, not the book's normal * 0.01: every weight and
# bias ~ U(-1/sqrt(hidden), 1/sqrt(hidden)), so both impls start from the same distribution and
# train alike under the same settings (only the initial biases spread differently: one draw here,
# the sum of two in torch).


def _param(*shape: int, hidden_size: int) -> nn.Parameter:
    bound = hidden_size**-0.5
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def _gate(input_size: int, hidden_size: int) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """One gate's W_x* (input, hidden), W_h* (hidden, hidden) and b_* (hidden,)."""
    return (_param(input_size, hidden_size, hidden_size=hidden_size),
            _param(hidden_size, hidden_size, hidden_size=hidden_size),
            _param(hidden_size, hidden_size=hidden_size))


def _input_term(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x W + b for all steps at once: (steps, batch, input) -> (steps, batch, hidden).

    Token ids (steps, batch) stand for one-hot rows, and one_hot(x) @ W is a row lookup W[x]
    (F.embedding): the book's product, without building the (steps, batch, vocab) one-hot tensor.
    """
    return (x @ W if x.is_floating_point() else F.embedding(x, W)) + b


class RNNCell(nn.Module):
    """d2l 8.5: H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h)."""

    name = "rnn"
    num_states = 1  # (h,)

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.W_xh, self.W_hh, self.b_h = _gate(input_size, hidden_size)

    def input_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (_input_term(x, self.W_xh, self.b_h),)  # (batch, steps, hidden)

    def forward(self, x_t: tuple[torch.Tensor, ...], state: State) -> State:
        (x_h,) = x_t  # X_t W_xh + b_h: (batch, hidden)
        (h,) = state  # (batch, hidden)
        h = torch.tanh(x_h + h @ self.W_hh)
        return (h,)

    def all_steps(self, terms: tuple[torch.Tensor, ...], state: State,
                  recurrence=RECURRENCES["rnn"]) -> tuple[torch.Tensor, State]:
        """`forward` over every step at once: terms (steps, batch, hidden) -> every h_t, (h,);
        `recurrence`: fused.TanhRecurrence or its compiled twin."""
        (x_h,), (h,) = terms, state
        outputs, h = recurrence.apply(x_h, h, self.W_hh.t())  # it takes W as nn.RNN keeps it
        return outputs, (h,)


class GRUCell(nn.Module):
    """d2l 9.1, in PyTorch's (and cuDNN's) form:

        Z_t = sigmoid(X_t W_xz + H_{t-1} W_hz + b_z)                     update gate
        R_t = sigmoid(X_t W_xr + H_{t-1} W_hr + b_r)                     reset gate
        H~_t = tanh(X_t W_xh + b_h + R_t * (H_{t-1} W_hh + b_hh))        candidate
        H_t = Z_t * H_{t-1} + (1 - Z_t) * H~_t

    The book writes the candidate as tanh(X_t W_xh + (R_t * H_{t-1}) W_hh + b_h): the reset gate
    scales the state BEFORE the recurrent matmul. nn.GRU scales the product AFTER it, and the
    recurrent bias b_hh sits inside that product, so it is a parameter of its own (not foldable
    into b_h). The two are different functions; this cell follows nn.GRU so the impls agree.
    """

    name = "gru"
    num_states = 1  # (h,)

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.W_xz, self.W_hz, self.b_z = _gate(input_size, hidden_size)
        self.W_xr, self.W_hr, self.b_r = _gate(input_size, hidden_size)
        self.W_xh, self.W_hh, self.b_h = _gate(input_size, hidden_size)
        # the candidate's recurrent bias, inside R_t * (...)
        self.b_hh = _param(hidden_size, hidden_size=hidden_size)

    def input_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (_input_term(x, self.W_xz, self.b_z),  # each (batch, steps, hidden)
                _input_term(x, self.W_xr, self.b_r),
                _input_term(x, self.W_xh, self.b_h))

    def forward(self, x_t: tuple[torch.Tensor, ...], state: State) -> State:
        x_z, x_r, x_h = x_t  # X_t W_x* + b_*: (batch, hidden) each
        (h,) = state  # (batch, hidden)
        z = torch.sigmoid(x_z + h @ self.W_hz)
        r = torch.sigmoid(x_r + h @ self.W_hr)
        h_tilde = torch.tanh(x_h + r * (h @ self.W_hh + self.b_hh))
        h = z * h + (1 - z) * h_tilde
        return (h,)

    def all_steps(self, terms: tuple[torch.Tensor, ...], state: State,
                  recurrence=RECURRENCES["gru"]) -> tuple[torch.Tensor, State]:
        """`forward` over every step at once: terms (steps, batch, hidden) -> every h_t, (h,);
        `recurrence`: fused.GRURecurrence or its compiled twin."""
        x_z, x_r, x_h = terms
        (h,) = state
        # nn.GRU's layout: gates stacked (r, z, n), weights (out, in), the recurrent bias of r
        # and z folded into the input terms
        gi = torch.cat([x_r, x_z, x_h], dim=-1)  # (steps, batch, 3*hidden)
        w_hh = torch.cat([self.W_hr, self.W_hz, self.W_hh], dim=1).t()  # (3*hidden, hidden)
        b_hh = torch.cat([torch.zeros_like(self.b_hh).repeat(2), self.b_hh])
        outputs, h = recurrence.apply(gi, h, w_hh, b_hh)
        return outputs, (h,)


class LSTMCell(nn.Module):
    """d2l 9.2 (the same function as nn.LSTM):

        I_t = sigmoid(X_t W_xi + H_{t-1} W_hi + b_i)       input gate
        F_t = sigmoid(X_t W_xf + H_{t-1} W_hf + b_f)       forget gate
        O_t = sigmoid(X_t W_xo + H_{t-1} W_ho + b_o)       output gate
        C~_t = tanh(X_t W_xc + H_{t-1} W_hc + b_c)         candidate memory
        C_t = F_t * C_{t-1} + I_t * C~_t
        H_t = O_t * tanh(C_t)
    """

    name = "lstm"
    num_states = 2  # (h, c)

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.W_xi, self.W_hi, self.b_i = _gate(input_size, hidden_size)
        self.W_xf, self.W_hf, self.b_f = _gate(input_size, hidden_size)
        self.W_xo, self.W_ho, self.b_o = _gate(input_size, hidden_size)
        self.W_xc, self.W_hc, self.b_c = _gate(input_size, hidden_size)

    def input_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (_input_term(x, self.W_xi, self.b_i),  # each (batch, steps, hidden)
                _input_term(x, self.W_xf, self.b_f),
                _input_term(x, self.W_xo, self.b_o),
                _input_term(x, self.W_xc, self.b_c))

    def forward(self, x_t: tuple[torch.Tensor, ...], state: State) -> State:
        x_i, x_f, x_o, x_c = x_t  # X_t W_x* + b_*: (batch, hidden) each
        h, c = state  # (batch, hidden) each
        i = torch.sigmoid(x_i + h @ self.W_hi)
        f = torch.sigmoid(x_f + h @ self.W_hf)
        o = torch.sigmoid(x_o + h @ self.W_ho)
        c_tilde = torch.tanh(x_c + h @ self.W_hc)
        c = f * c + i * c_tilde
        h = o * torch.tanh(c)
        return (h, c)


class ScratchRNN(nn.Module):
    """Stacked scratch cells: each layer runs its cell over time; its outputs feed the next.
    A cell with `all_steps` (rnn, gru) runs by the path `training_path` measured fastest, with
    gradients and without (evaluation, generation)."""

    def __init__(self, cell: type[nn.Module], input_size: int, hidden_size: int,
                 num_layers: int, dropout: float):
        super().__init__()
        self.num_states, self.cell = cell.num_states, cell.name
        self.cells = nn.ModuleList(
            cell(input_size if layer == 0 else hidden_size, hidden_size)
            for layer in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)

    def paths(self) -> list[str]:
        """What can train this stack on the CPU, the reference (the book's loop) first; only the
        loop for a cell without `all_steps` (lstm)."""
        return dispatch.training_paths(self.cell) if hasattr(self.cells[0], "all_steps") else ["reference"]

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return self.run(x, state, dispatch.training_path(self, x, state))

    def run(self, x: torch.Tensor, state: State, path: str) -> tuple[torch.Tensor, State]:
        """`reference`: the loop over steps; `fused` | `native`: a cell with `all_steps` runs
        every step as one op, by that path."""
        # x: token ids (steps, batch) for one-hot input, else (steps, batch, input)
        final = []  # per layer: its last (h,) or (h, c)
        for layer, cell in enumerate(self.cells):
            if layer > 0:
                x = self.dropout(x)  # between layers, like nn.RNN's dropout
            s = tuple(part[layer] for part in state)  # this layer's (h,) | (h, c), (batch, hidden)
            terms = cell.input_terms(x)  # per gate (steps, batch, hidden), before the loop
            if path != "reference" and hasattr(cell, "all_steps"):
                x, s = cell.all_steps(terms, s, dispatch.recurrence_of(self.cell, path))
            else:
                outputs = []
                for x_t in zip(*terms):  # per gate (batch, hidden)
                    s = cell(x_t, s)
                    outputs.append(s[0])  # h_t
                x = torch.stack(outputs)  # (steps, batch, hidden)
            final.append(s)
        state = tuple(torch.stack(parts) for parts in zip(*final))  # (num_layers, batch, hidden)
        return x, state
