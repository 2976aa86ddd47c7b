"""PyTorch's word_language_model example (pytorch/examples), as its code trains: the word rows'
baseline. model.py's untied RNNModel for `--model LSTM`, and main.py's batchify, get_batch,
repackage_hidden and the body of train(), costs kept (the separate log_softmax, one in-place
add per parameter, `.item()` each minibatch). Left out: the other models, logging, evaluation,
lr annealing, data.Corpus and the device choice.

    model = WordLM(ntoken=10_000, ninp=200, nhid=200, nlayers=2, dropout=0.0)
    source = batchify(ids, batch_size)               # (len(ids) // batch_size, batch_size)
    data, targets = get_batch(source, i, bptt)       # (bptt, batch), (bptt * batch,)
    step = wlm_step(model, lr=20, clip=0.25)         # step(data, targets) -> the minibatch's loss
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Hidden = tuple[torch.Tensor, torch.Tensor]  # nn.LSTM's (h, c), each (nlayers, batch, nhid)


class WordLM(nn.Module):
    """model.py's RNNModel with rnn_type "LSTM": the encoder, dropout, nn.LSTM, the decoder."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.5):
        super().__init__()
        self.ntoken, self.nhid, self.nlayers = ntoken, nhid, nlayers
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)  # between layers only
        self.decoder = nn.Linear(nhid, ntoken)
        self.init_weights()

    def init_weights(self) -> None:
        """The example's initialisation of encoder and decoder; the LSTM keeps torch's."""
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, input: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """input (bptt, batch) ids -> log-probabilities (bptt * batch, ntoken), time-major."""
        emb = self.drop(self.encoder(input))  # (bptt, batch, ninp)
        output, hidden = self.rnn(emb, hidden)  # (bptt, batch, nhid)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> Hidden:
        """Zeros (h, c) on the weights' device, in their dtype."""
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid))


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """The token stream as `bsz` contiguous columns, the remainder dropped:

        stream a b c d e f g h i j k l, bsz 3  ->  a e i
                                                   b f j
                                                   c g k
                                                   d h l     (len(data) // bsz, bsz)
    """
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows i..i+bptt of `source` and, one row down, their targets, flattened time-major:

        source  a e i     i = 0, bptt 2:  data  a e i    targets  b f j c g k
                b f j                           b f j
                c g k
    """
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].view(-1)


def repackage_hidden(h):
    """The same values cut from the graph (truncated BPTT); a tensor or nested tuples of them."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


StepFn = Callable[[torch.Tensor, torch.Tensor], float]


def wlm_step(model: WordLM, lr: float, clip: float) -> StepFn:
    """The body of main.py's train() as a function of one minibatch (data, targets), from
    get_batch; the state is carried from one call to the next. Returns the minibatch's loss, read
    back as main.py does for its running total."""
    criterion = nn.NLLLoss()
    model.train()
    hidden = None
    total_loss = 0.0

    def step(data: torch.Tensor, targets: torch.Tensor) -> float:
        nonlocal hidden, total_loss
        if hidden is None:
            hidden = model.init_hidden(data.shape[1])  # once per epoch in main.py
        model.zero_grad()
        hidden = repackage_hidden(hidden)  # detach: truncate BPTT
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        value = loss.item()
        total_loss += value
        return value

    return step
