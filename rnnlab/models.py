"""The RNN language models of d2l chapters 8-9, every variant behind one interface.

    logits, state = model(idx, state)   # idx (batch, steps) -> logits (batch, steps, vocab)

A model is: tokens -> input (one-hot, or a learned embedding, then dropout) -> `num_layers`
recurrent layers (dropout between them) -> dropout -> one Linear layer applied to every step at
once -> logits. Dropout acts on every non-recurrent connection, never on the state carried from
step to step (Zaremba et al. 2014). With `tie_weights` the Linear layer's weight IS the embedding
(Press & Wolf 2017; Inan et al. 2017): one (vocab, hidden) matrix reads tokens and scores them.

For training and held-out scores, `loss, state = model.loss(idx, targets, state)` gives the
summed cross-entropy without making the caller hold the logits: for a large vocabulary it is
rnnlab/softmax.py's fused output layer and loss (one product, no log-softmax copy).

    cell  rnn  | gru  | lstm        state (h,) | (h,) | (h, c), each (num_layers, batch, hidden)
    impl  scratch: the book's equations, explicit parameters, a Python loop over time steps
          torch:   nn.RNN (tanh) / nn.GRU / nn.LSTM: cuDNN on a GPU; on the CPU other paths
                   with the same parameters too (below)

The two impls of a cell compute the same function (tests/test_models.py checks logits, state and
gradients to 1e-10 in float64), so they differ only in speed; so do the paths that can train a
stack on the CPU: `reference` (nn.RNN / nn.GRU / nn.LSTM, or the scratch cells' loop over steps),
`fused` (rnn and gru: rnnlab/fused.py) and `native` (compiled, rnn, gru and the torch impl's lstm:
rnnlab/native.py). Which one trains is measured on the first minibatch, per machine and shape
(`training_path`, rnnlab/kernels.py). `build_model` is the only place that branches on cell or
impl.
The state a model returns has its parameters' dtype, under autocast too, so the state carried
from one minibatch to the next never changes dtype.

Every scratch cell obeys one contract, in two halves:

    terms = cell.input_terms(x)   # what depends only on the input (x W_x* + b_*), one term per
                                  # gate, for all time steps at once: (steps, batch, hidden) each
    state = cell(x_t, state)      # one time step; x_t = those terms at step t: (batch, hidden) each

The input terms do not depend on the state, so they are computed outside the time loop in one
matmul per gate; only the recurrent part (h W_h*) runs step by step. The rnn and gru cells also
have `outputs, state = cell.all_steps(terms, state, recurrence)`: the same function over every
step as one autograd op, the fused (or native) path of the torch impl on the scratch parameters.
On the CPU (outside autocast) it runs where it measured faster than the loop, and always without
gradients; the loop over `cell(x_t, state)` runs everywhere else, and the tests check that the
two agree.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rnnlab import kernels, native
from rnnlab.fused import LAYERS, RECURRENCES, Head, fused_applies, use_onednn
from rnnlab.softmax import linear_cross_entropy

if TYPE_CHECKING:
    from rnnlab.config import Train, Variant

# (h,) for rnn and gru, (h, c) for lstm; each (num_layers, batch, hidden)
State = tuple[torch.Tensor, ...]

# From this vocabulary size `RNNLM.loss` scores with rnnlab/softmax.py's fused output layer and
# loss, which pays where the (rows, vocab) logits are the big tensor (measured in its docstring
# at 10,000 words: 0.7-0.8x the time of F.cross_entropy(F.linear)); below it they are small, the
# separate ops cost little, and the char-level path keeps its `Head` product.
FUSED_LOSS_VOCAB = 1000


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; checkpoints store `dataclasses.asdict` of it."""

    vocab_size: int  # tokens in the vocabulary: the input one-hot size and the number of logits
    cell: str  # rnn | gru | lstm
    impl: str  # scratch (the book's equations) | torch (nn.RNN / nn.GRU / nn.LSTM)
    num_layers: int = 1  # stacked recurrent layers (>= 1)
    hidden_size: int = 256  # hidden units per layer (>= 1)
    embed_size: int = 0  # 0: one-hot input (as in the book); > 0: learned nn.Embedding of this size
    dropout: float = 0.0  # on the embedding's output, between layers and before the head, [0, 1)
    tie_weights: bool = False  # the head's weight is the embedding's (embed_size == hidden_size)

    def __post_init__(self) -> None:
        minimum = {"vocab_size": 1, "num_layers": 1, "hidden_size": 1, "embed_size": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"ModelConfig.{name} = {value!r}: must be an integer >= {low}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig.dropout = {self.dropout!r}: must be in [0, 1)")
        if self.tie_weights and self.embed_size != self.hidden_size:
            raise ValueError(f"ModelConfig.tie_weights needs embed_size == hidden_size, got "
                             f"{self.embed_size} and {self.hidden_size}")


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
        tie_weights=variant.tie_weights,
    )


def new_model(variant: Variant, train: Train, vocab_size: int) -> RNNLM:
    """A variant's model as training starts it: built, then drawn in ±train.init_scale when set
    (else PyTorch's own initialisation); seed torch's global generator first."""
    model = build_model(model_config(variant, train, vocab_size))
    if train.init_scale is not None:
        init_uniform(model, train.init_scale)
    return model


def init_uniform(model: nn.Module, scale: float) -> None:
    """Every parameter uniform in [-scale, scale], as Zaremba et al. initialise (train.init_scale);
    draws from torch's global generator, which the train stage seeds."""
    with torch.no_grad():
        for p in model.parameters():  # a tied weight is one parameter: drawn once
            p.uniform_(-scale, scale)


def detach_state(state: State) -> State:
    """The same values cut from the graph: truncates BPTT between minibatches. (h,) or (h, c)."""
    return tuple(s.detach() for s in state)


class RNNLM(nn.Module):
    """Every variant: input (-> dropout, for an embedding) -> recurrent layers (`rnn`, from the
    factory) -> dropout -> Linear, whose weight may be the embedding's (`tie_weights`)."""

    def __init__(self, config: ModelConfig, rnn: nn.Module):
        super().__init__()
        self.config = config
        embed = config.embed_size
        self.embedding = nn.Embedding(config.vocab_size, embed) if embed else None
        self.rnn = rnn  # ScratchRNN | TorchRNN: (x, state) -> (outputs, state), time-major
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_weights:  # one parameter, the head's (its initialisation, its place)
            self.embedding.weight = self.head.weight

    def forward(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits (batch, steps, vocab) of the token after each of idx (batch, steps)."""
        outputs, state = self.features(idx, state)
        if self.config.vocab_size < self.config.hidden_size:  # transpose the smaller tensor
            return self._head(outputs).transpose(0, 1), state
        return self._head(outputs.transpose(0, 1)), state

    def loss(self, idx: torch.Tensor, targets: torch.Tensor,
             state: State | None = None) -> tuple[torch.Tensor, State]:
        """The summed cross-entropy of `targets` (batch, steps) after idx (batch, steps), and the
        state: `forward`'s logits scored, by the cheapest route for the vocabulary's size."""
        outputs, state = self.features(idx, state)
        rows = outputs.flatten(0, 1)  # time-major rows, so the targets go time-major too
        y = targets.t().flatten()
        if self.config.vocab_size >= FUSED_LOSS_VOCAB and not torch.is_autocast_enabled(rows.device.type):
            return linear_cross_entropy(rows, self.head.weight, self.head.bias, y), state
        logits = self._head(rows)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y,
                               reduction="sum"), state

    def features(self, idx: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """What the head reads: (steps, batch, hidden), after dropout; and the new state."""
        if state is None:
            state = self.init_state(idx.shape[0], idx.device)
        # Time-major inside, as in the book: step t is x[t]. Without an embedding the token ids
        # go on as they are; each impl makes them one-hot.
        # x: (steps, batch) ids | (steps, batch, embed)
        x = idx.t() if self.embedding is None else self.dropout(self.embedding(idx.t()))
        outputs, state = self.rnn(x, state)  # (steps, batch, hidden)
        # autocast leaves some layers' state in bfloat16 (nn.RNN, nn.LSTM) and others' in float32
        dtype = self.head.weight.dtype
        return self.dropout(outputs), tuple(s.to(dtype) for s in state)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The Linear layer on (..., hidden): every step in one product."""
        if fused_applies(h) and use_onednn(h):  # the same product, faster: `Head`
            return Head.apply(h.reshape(-1, h.shape[-1]), self.head.weight,
                              self.head.bias).view(*h.shape[:-1], -1)
        return self.head(h)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """Zeros: (h,) or (h, c), each (num_layers, batch, hidden); device, dtype: the weights'."""
        weight = self.head.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        zeros = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.rnn.num_states)]
        return tuple(zeros)


# --- impl "torch" ---------------------------------------------------------------------------------


@functools.cache
def cpu_bf16_runs(module: type[nn.RNNBase]) -> bool:
    """Whether `module` runs under bfloat16 autocast on this CPU. oneDNN's recurrent kernels
    refuse bfloat16 on some CPUs ("could not create a primitive descriptor for the LSTM forward
    propagation primitive", seen on an AMD EPYC without AVX-512); there the module runs in
    float32 instead. Asked once per process, with a one-step module."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            module(2, 2)(torch.zeros(1, 1, 2))
        return True
    except RuntimeError:
        return False


class TorchRNN(nn.Module):
    """nn.RNN (tanh) / nn.GRU / nn.LSTM behind the scratch stack's interface.

    Paths (`run`): `reference` runs the nn.* module itself; `fused` (rnn, gru) and `native` (rnn,
    gru, lstm) compute the same function from the same parameters (rnnlab/fused.py,
    rnnlab/native.py). `forward` takes the path `training_path` measured fastest while gradients
    are recorded on the CPU, the module everywhere else: without gradients nn.RNN's / nn.GRU's own
    kernel is faster (2.7x the fused path at batch 1, 256 hidden); cuDNN on a GPU already runs the
    whole sequence in one kernel.
    """

    CELLS = {nn.RNN: "rnn", nn.GRU: "gru", nn.LSTM: "lstm"}
    no_grad_path = "reference"

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
        return training_paths(self.cell)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return self.run(x, state, training_path(self, x, state))

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
        layer_fn, recurrence = LAYERS[self.cell], recurrence_of(self.cell, path)
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


# --- which path trains a stack: measured ----------------------------------------------------------


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
    """The path `stack` runs x by: on the CPU outside autocast with gradients recorded, the one
    measured fastest for this shape (rnnlab/kernels.py); without gradients the stack's
    `no_grad_path`; `reference` on other devices and under autocast."""
    if not fused_applies(x):
        return "reference"
    if not torch.is_grad_enabled():
        return stack.no_grad_path
    paths = stack.paths()
    if len(paths) == 1:
        return paths[0]
    p = next(stack.parameters())
    key = (f"{stack.cell} {type(stack).__name__.removesuffix('RNN').lower()}: "
           f"{state[0].shape[0]} layer(s) x {state[0].shape[-1]}, "
           f"{'one-hot' if not x.is_floating_point() else f'{x.shape[-1]}-wide'} input, "
           f"{x.shape[0]} steps x batch {x.shape[1]}, {str(p.dtype)[6:]}")
    return kernels.choose("layer", key, {path: functools.partial(_train_pass, stack, x, state, path)
                                         for path in paths})


def _train_pass(stack: nn.Module, x: torch.Tensor, state: State, path: str) -> None:
    """One forward and backward of `stack` by `path` on the inputs' shapes, leaving every
    parameter's .grad as it was: what `training_path` times."""
    with torch.enable_grad():
        x = x.detach().requires_grad_() if x.is_floating_point() else x
        state = tuple(s.detach().requires_grad_() for s in state)
        outputs, last = stack.run(x, state, path)
        loss = outputs.sum() + sum(s.sum() for s in last)
        torch.autograd.grad(loss, [*stack.parameters(), *state])


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
    Without gradients (evaluation, generation) a cell with `all_steps` takes the fused path, far
    faster than the loop; with them, the path `training_path` measured fastest."""

    no_grad_path = "fused"

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
        return training_paths(self.cell) if hasattr(self.cells[0], "all_steps") else ["reference"]

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return self.run(x, state, training_path(self, x, state))

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
                x, s = cell.all_steps(terms, s, recurrence_of(self.cell, path))
            else:
                outputs = []
                for x_t in zip(*terms):  # per gate (batch, hidden)
                    s = cell(x_t, s)
                    outputs.append(s[0])  # h_t
                x = torch.stack(outputs)  # (steps, batch, hidden)
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
