"""The book's two partitionings: sequential continues each row, random covers the corpus once."""

import pytest
import torch

from rnnlab.data.batches import min_tokens, random_batches, sequential_batches


@pytest.mark.parametrize("seed", range(5))
def test_sequential_batches_continue_each_row(seed):
    ids = torch.arange(200)
    batches = list(sequential_batches(ids, 4, 7, torch.Generator().manual_seed(seed)))
    assert len(batches) >= 5
    for (x0, y0), (x1, _) in zip(batches, batches[1:]):
        assert x0.shape == (4, 7)
        assert torch.equal(y0, x0 + 1)                    # targets: the next token
        assert torch.equal(x1[:, 0], x0[:, -1] + 1)       # each row continues where it stopped


@pytest.mark.parametrize("seed", range(5))
def test_random_batches_cover_the_corpus_once(seed):
    ids = torch.arange(200)
    batches = list(random_batches(ids, 4, 7, torch.Generator().manual_seed(seed)))
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert len(set(starts.tolist())) == len(starts)        # no subsequence twice
    assert ((starts - starts.min()) % 7 == 0).all()         # non-overlapping windows
    covered = torch.cat([x.flatten() for x, _ in batches])
    assert len(set(covered.tolist())) == len(covered)      # no token twice
    assert len(covered) > 200 - 7 * 4 - 7 - 1              # everything but the tail of one batch
    for x, y in batches:
        assert torch.equal(y, x + 1)


def test_min_tokens_is_enough_for_any_offset():
    for seed in range(20):
        n = min_tokens(3, 5)
        g = torch.Generator().manual_seed(seed)
        assert len(list(sequential_batches(torch.arange(n), 3, 5, g))) >= 1
        assert len(list(random_batches(torch.arange(n), 3, 5, g))) >= 1


def test_same_generator_state_same_batches():
    ids = torch.arange(300)
    a = [x for x, _ in random_batches(ids, 4, 5, torch.Generator().manual_seed(3))]
    b = [x for x, _ in random_batches(ids, 4, 5, torch.Generator().manual_seed(3))]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
