"""The RNN language models of d2l chapters 8-9, every variant behind one interface.

    logits, state = model(idx, state)              # idx (batch, steps) -> (batch, steps, vocab)
    loss, state = model.loss(idx, targets, state)  # the summed cross-entropy, no logits held

tokens -> one-hot or a learned embedding -> `num_layers` recurrent layers -> one Linear layer on
every step at once -> logits. Dropout acts on every non-recurrent connection, never on the state
carried from step to step (Zaremba et al. 2014); with `tie_weights` the Linear layer's weight IS
the embedding (Press & Wolf 2017). A cell (rnn, gru, lstm: state (h,) or (h, c), each
(num_layers, batch, hidden)) has two impls that compute the same function, `scratch` (the book's
equations: rnnlab/models/scratch.py) and `torch` (nn.RNN / nn.GRU / nn.LSTM:
rnnlab/models/concise.py), checked by tests/models/test_models.py. `build_model` is the only
place that branches on cell or impl. The state keeps the parameters' dtype, under autocast too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rnnlab.kernels.fused import Head, fused_applies, use_onednn
from rnnlab.kernels.softmax import linear_cross_entropy
from rnnlab.models.concise import TorchRNN
from rnnlab.models.dispatch import State
from rnnlab.models.scratch import GRUCell, LSTMCell, RNNCell, ScratchRNN

if TYPE_CHECKING:
    from rnnlab.config import Train, Variant

# From this vocabulary size `RNNLM.loss` scores with rnnlab/kernels/softmax.py's fused output
# layer and loss, which pays where the (rows, vocab) logits are the big tensor; below it they are
# small, the separate ops cost little, and the char-level path keeps its `Head` product.
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
