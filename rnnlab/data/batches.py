"""Minibatches for truncated BPTT, the two ways the book partitions a token sequence (d2l 8.3.4).

    sequential  the corpus (from a random offset) cut into `batch_size` contiguous rows, walked
                `num_steps` at a time: minibatch i+1 continues each row of minibatch i, so the
                hidden state can be carried over

                row 0: [ X0 | X1 | X2 | ... ]      minibatch k = column k of every row
                row 1: [ X0 | X1 | X2 | ... ]      shape (batch_size, num_steps)

    random      the corpus (from a random offset) cut into subsequences of `num_steps` tokens,
                each served once per epoch in a random order: the state is reset every minibatch

Y is X shifted by one token. Randomness comes only from the torch.Generator passed in, so an
epoch's minibatches are reproducible from its state (which resumable checkpoints save).
"""

from __future__ import annotations

from typing import Iterator

import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # X, Y: (batch_size, num_steps) each


def min_tokens(batch_size: int, num_steps: int) -> int:
    """Tokens needed for one minibatch whatever the random offset (< num_steps) turns out to be."""
    return batch_size * num_steps + num_steps + 1


def sequential_batches(ids: torch.Tensor, batch_size: int, num_steps: int,
                       gen: torch.Generator) -> Iterator[Batch]:
    offset = int(torch.randint(0, num_steps, (1,), generator=gen))
    row_len = (len(ids) - offset - 1) // batch_size
    xs = ids[offset : offset + batch_size * row_len].view(batch_size, row_len)
    ys = ids[offset + 1 : offset + 1 + batch_size * row_len].view(batch_size, row_len)
    for i in range(0, (row_len // num_steps) * num_steps, num_steps):
        yield xs[:, i : i + num_steps], ys[:, i : i + num_steps]


def random_batches(ids: torch.Tensor, batch_size: int, num_steps: int,
                   gen: torch.Generator) -> Iterator[Batch]:
    offset = int(torch.randint(0, num_steps, (1,), generator=gen))
    num_subseqs = (len(ids) - offset - 1) // num_steps
    starts = offset + num_steps * torch.randperm(num_subseqs, generator=gen)
    window = torch.arange(num_steps)
    for b in range(num_subseqs // batch_size):
        idx = starts[b * batch_size : (b + 1) * batch_size, None] + window  # (batch, num_steps)
        yield ids[idx], ids[idx + 1]


SAMPLERS = {"sequential": sequential_batches, "random": random_batches}


def num_batches(n_tokens: int, batch_size: int, num_steps: int) -> int:
    """Minibatches per epoch (at most; the random offset may cost one)."""
    return ((n_tokens - 1) // batch_size) // num_steps
