"""The RNN language models of d2l chapters 8-9, every variant behind one interface.

    logits, state = model(idx, state)   # idx (batch, steps) -> logits (batch, steps, vocab)

A model is: tokens -> input (one-hot, or a learned embedding) -> `num_layers` recurrent layers
-> dropout -> one Linear layer applied to every step at once -> logits.

    cell  rnn  | gru  | lstm        state (h,) | (h,) | (h, c), each (num_layers, batch, hidden)
    impl  scratch: the book's equations, explicit parameters, a Python loop over time steps
          torch:   nn.RNN (tanh) / nn.GRU / nn.LSTM (cuDNN on a GPU)

The two impls of a cell compute the same function (tests/test_models.py checks logits, state and
gradients to 1e-10 in float64), so they differ only in speed. `build_model` is the only place that
branches on cell or impl.

Every scratch cell obeys one contract, in two halves:

    terms = cell.input_terms(x)   # what depends only on the input (x W_x* + b_*), one term per
                                  # gate, for all time steps at once: (batch, steps, hidden) each
    state = cell(x_t, state)      # one time step; x_t = those terms at step t: (batch, hidden) each

The input terms do not depend on the state, so they are computed outside the time loop in one
matmul per gate; only the recurrent part (h W_h*) runs step by step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from rnnlab.config import Train, Variant

# (h,) for rnn and gru, (h, c) for lstm; each (num_layers, batch, hidden)
State = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; checkpoints store `dataclasses.asdict` of it."""

    vocab_size: int  # tokens in the vocabulary: the input one-hot size and the number of logits
    cell: str  # rnn | gru | lstm
    impl: str  # scratch (the book's equations) | torch (nn.RNN / nn.GRU / nn.LSTM)
    num_layers: int = 1  # stacked recurrent layers (>= 1)
    hidden_size: int = 256  # hidden units per layer (>= 1)
    embed_size: int = 0  # 0: one-hot input (as in the book); > 0: learned nn.Embedding of this size
    dropout: float = 0.0  # on every layer's outputs (between layers, before the head), [0, 1)

    def __post_init__(self) -> None:
        minimum = {"vocab_size": 1, "num_layers": 1, "hidden_size": 1, "embed_size": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"ModelConfig.{name} = {value!r}: must be an integer >= {low}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig.dropout = {self.dropout!r}: must be in [0, 1)")


def model_config(variant: Variant, train: Train, vocab_size: int) -> ModelConfig:
    """The model of one variant; `train` is the variant's resolved training settings."""
    return ModelConfig(
        vocab_size=vocab_size,
        cell=variant.cell,
        impl=variant.impl,
        num_layers=variant.num_layers,
        hidden_size=train.hidden_size,
        embed_size=variant.embed_size,
        dropout=train.dropout,
    )


def detach_state(state: State) -> State:
    """The same values cut from the graph: truncates BPTT between minibatches. (h,) or (h, c)."""
    return tuple(s.detach() for s in state)


class RNNLM(nn.Module):
    """Every variant: input -> recurrent layers (`rnn`, from the factory) -> dropout -> Linear."""

    def __init__(self, config: ModelConfig, rnn: nn.Module):
        super().__init__()
        self.config = config
        embed = config.embed_size
        self.embedding = nn.Embedding(config.vocab_size, embed) if embed else None
        self.rnn = rnn  # ScratchRNN | TorchRNN: (x, state) -> (outputs, state)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.init_state(idx.shape[0], idx.device)
        # Without an embedding the token ids go on as they are; each impl makes them one-hot.
        # x: (batch, steps) token ids | (batch, steps, embed)
        x = idx if self.embedding is None else self.embedding(idx)
        outputs, state = self.rnn(x, state)  # (batch, steps, hidden)
        logits = self.head(self.dropout(outputs))  # (batch, steps, vocab): all steps in one matmul
        return logits, state

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """Zeros: (h,) or (h, c), each (num_layers, batch, hidden); device, dtype: the weights'."""
        weight = self.head.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        zeros = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.rnn.num_states)]
        return tuple(zeros)


# --- impl "torch" ---------------------------------------------------------------------------------


class TorchRNN(nn.Module):
    """nn.RNN (tanh) / nn.GRU / nn.LSTM behind the scratch stack's interface."""

    def __init__(self, module: type[nn.RNNBase], input_size: int, hidden_size: int,
                 num_layers: int, dropout: float):
        super().__init__()
        # nn.RNN's dropout acts between layers only (and warns if given with one layer).
        self.rnn = module(input_size, hidden_size, num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.num_states = 2 if isinstance(self.rnn, nn.LSTM) else 1  # nn.LSTM carries (h, c)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if not x.is_floating_point():  # token ids: one-hot, as the book's concise RNN
            dtype = self.rnn.weight_ih_l0.dtype
            x = F.one_hot(x, self.rnn.input_size).to(dtype)  # (batch, steps, vocab)
        hx = state if self.num_states == 2 else state[0]  # nn.LSTM takes (h, c), the others h
        outputs, hx = self.rnn(x, hx)  # (batch, steps, hidden)
        return outputs, hx if isinstance(hx, tuple) else (hx,)


# --- impl "scratch" -------------------------------------------------------------------------------
#
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
    """x W + b for all steps at once: (batch, steps, input) -> (batch, steps, hidden).

    Token ids (batch, steps) stand for one-hot rows, and one_hot(x) @ W is a row lookup W[x]
    (F.embedding): the book's product, without building the (batch, steps, vocab) one-hot tensor.
    """
    return (x @ W if x.is_floating_point() else F.embedding(x, W)) + b


class RNNCell(nn.Module):
    """d2l 8.5: H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h)."""

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


class LSTMCell(nn.Module):
    """d2l 9.2 (the same function as nn.LSTM):

        I_t = sigmoid(X_t W_xi + H_{t-1} W_hi + b_i)       input gate
        F_t = sigmoid(X_t W_xf + H_{t-1} W_hf + b_f)       forget gate
        O_t = sigmoid(X_t W_xo + H_{t-1} W_ho + b_o)       output gate
        C~_t = tanh(X_t W_xc + H_{t-1} W_hc + b_c)         candidate memory
        C_t = F_t * C_{t-1} + I_t * C~_t
        H_t = O_t * tanh(C_t)
    """

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
    """Stacked scratch cells: each layer runs its cell over time; its outputs feed the next."""

    def __init__(self, cell: type[nn.Module], input_size: int, hidden_size: int,
                 num_layers: int, dropout: float):
        super().__init__()
        self.num_states = cell.num_states
        self.cells = nn.ModuleList(
            cell(input_size if layer == 0 else hidden_size, hidden_size)
            for layer in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        # x: token ids (batch, steps) for one-hot input, else (batch, steps, input)
        final = []  # per layer: its last (h,) or (h, c)
        for layer, cell in enumerate(self.cells):
            if layer > 0:
                x = self.dropout(x)  # between layers, like nn.RNN's dropout
            s = tuple(part[layer] for part in state)  # this layer's (h,) | (h, c), (batch, hidden)
            terms = cell.input_terms(x)  # per gate (batch, steps, hidden), before the loop
            outputs = []
            for x_t in zip(*(term.unbind(1) for term in terms)):  # per gate (batch, hidden)
                s = cell(x_t, s)
                outputs.append(s[0])  # h_t
            x = torch.stack(outputs, dim=1)  # (batch, steps, hidden)
            final.append(s)
        state = tuple(torch.stack(parts) for parts in zip(*final))  # (num_layers, batch, hidden)
        return x, state


# --- the factory ----------------------------------------------------------------------------------

CELLS = ("rnn", "gru", "lstm")
# impl -> (the stack of layers, cell -> what it stacks). Both stacks take the same arguments.
IMPLS = {
    "scratch": (ScratchRNN, {"rnn": RNNCell, "gru": GRUCell, "lstm": LSTMCell}),
    "torch": (TorchRNN, {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}),
}


def build_model(cfg: ModelConfig) -> RNNLM:
    """The model a config describes: the one place that branches on cell and impl."""
    if cfg.cell not in CELLS:
        raise ValueError(f"unknown cell {cfg.cell!r}; allowed: {', '.join(CELLS)}")
    if cfg.impl not in IMPLS:
        raise ValueError(f"unknown impl {cfg.impl!r}; allowed: {', '.join(IMPLS)}")
    stack, cells = IMPLS[cfg.impl]
    input_size = cfg.embed_size or cfg.vocab_size  # one-hot input: the vocabulary size
    rnn = stack(cells[cfg.cell], input_size, cfg.hidden_size, cfg.num_layers, cfg.dropout)
    return RNNLM(cfg, rnn)
