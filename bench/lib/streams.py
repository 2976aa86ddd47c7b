"""The token streams both sides of the benchmark train on: The Time Machine's characters, Penn
Treebank's words or a Zipf stream, as minibatches."""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import torch

from bench.lib.book_vs_ours import WORD
from bench.lib.flops import GATES
from bench.lib.wlm import batchify, get_batch
from rnnlab.config import Data, Tokenize
from rnnlab.corpora import BUILTIN
from rnnlab.data.batches import sequential_batches
from rnnlab.data.corpus import tokenize_corpus
from rnnlab.models.lm import ModelConfig


def time_machine(tok: Tokenize) -> tuple[torch.Tensor, torch.Tensor, object]:
    """The training and validation ids of The Time Machine (the whole bundled text, tokenized as
    params.yaml's `tokenize` says) and its vocabulary."""
    text = BUILTIN["timemachine"].bundled_path().read_text(encoding="utf-8")
    book = Data(corpus="timemachine", source=None, sha1=None, max_tokens=None)
    tokens = tokenize_corpus(text, book, tok)
    return (torch.as_tensor(tokens.splits["train"]), torch.as_tensor(tokens.splits["val"]),
            tokens.vocab)


def minibatches(ids: torch.Tensor, batch_size: int, num_steps: int, count: int,
                device: torch.device = torch.device("cpu"), seed: int = 0):
    """`count` sequential minibatches (x, y), epoch after epoch, made in advance on `device`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < count:
        out.extend(sequential_batches(ids, batch_size, num_steps, gen))
    return [(x.to(device).contiguous(), y.to(device).contiguous()) for x, y in out[:count]]


def ptb_ids(path: Path) -> torch.Tensor:
    """The words of ptb/ptb.train.txt in the zip at `path`, "<eos>" after every line, numbered by
    frequency (0 the most frequent; ties in order of first appearance)."""
    member = "ptb/ptb.train.txt"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if member not in names:
            raise SystemExit(f"--ptb {path}: no {member} in it (it holds "
                             f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''})")
        text = z.read(member).decode("utf-8")
    words = [w for line in text.splitlines() for w in (*line.split(), "<eos>")]
    number = {w: i for i, (w, _) in enumerate(Counter(words).most_common())}
    return torch.tensor([number[w] for w in words])


def zipf_ids(n: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """`n` ids drawn independently with P(k) proportional to 1 / (k + 1), Zipf's law, which word
    frequencies roughly follow: a stand-in for a corpus (the speed of a step does not depend on
    which words it sees). The same ids for the same arguments."""
    weights = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def word_minibatches(ids: torch.Tensor, batch_size: int, num_steps: int, count: int,
                     device: torch.device = torch.device("cpu")):
    """`count` minibatches of the word rows, epoch after epoch, made in advance on `device`, in the
    layout of each side: wlm's (data (steps, batch), targets (steps * batch,)) from its batchify
    and get_batch, and ours (x, y), each (batch, steps), the same tokens transposed. Only full
    chunks of `num_steps` (get_batch makes the last one shorter)."""
    source = batchify(ids, batch_size).to(device)  # (len(ids) // batch, batch)
    starts = range(0, len(source) - num_steps, num_steps)
    if not starts:
        raise SystemExit(f"{len(ids)} tokens make no minibatch of {batch_size} x {num_steps}")
    wlm, ours = [], []
    for k in range(count):
        data, targets = get_batch(source, starts[k % len(starts)], num_steps)
        wlm.append((data, targets))
        ours.append((data.t().contiguous(), targets.view(num_steps, batch_size).t().contiguous()))
    return wlm, ours


def word_data(ptb: Path | None, count: int) -> tuple[torch.Tensor, int, str]:
    """The word rows' tokens (at least `count` minibatches), their vocabulary size, and what they
    are: Penn Treebank's training words from the zip `ptb`, or a synthetic Zipf stream."""
    if ptb is None:
        n = (count + 1) * WORD["num_steps"] * WORD["batch"]
        return (zipf_ids(n, WORD["vocab_size"]), WORD["vocab_size"],
                f"a synthetic Zipf stream ({n:,} ids over {WORD['vocab_size']:,})")
    ids = ptb_ids(ptb)
    vocab_size = int(ids.max()) + 1
    return (ids, vocab_size, f"Penn Treebank's training words ({ptb.name}: {len(ids):,} tokens, "
                             f"{vocab_size:,} words)")


def word_shapes(cfg: ModelConfig, batch: int, num_steps: int) -> dict[str, tuple[int, int, int]]:
    """The product behind each part of `forward_flops`, as (m, k, n): the input projection of
    all steps at once (the first layer's; the others' is the same when embed_size = hidden_size),
    the recurrent product of one step, the head over all steps."""
    width, rows = GATES[cfg.cell] * cfg.hidden_size, batch * num_steps
    return {"input": (rows, cfg.embed_size or cfg.hidden_size, width),
            "recurrent": (batch, cfg.hidden_size, width),
            "output": (rows, cfg.hidden_size, cfg.vocab_size)}
