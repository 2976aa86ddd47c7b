"""Text from a trained model: the book's prediction after a prefix (d2l 8.5.4), and sampling.

Warm-up: the prefix is read in one pass to build the state, then each next token is chosen from
the last output (argmax for greedy; a softmax with a temperature for sampling) and fed back.
"""

from __future__ import annotations

import sys

import torch

from rnnlab.models import RNNLM
from rnnlab.text import tokenize
from rnnlab.vocab import Vocab


def encode_prefix(vocab: Vocab, prefix: str, warn: bool = True) -> torch.Tensor:
    """Ids of the prefix; tokens unseen in training become <unk>, with a warning."""
    tokens = tokenize(prefix, vocab.token_type)
    if not tokens:
        raise ValueError("an empty prefix has nothing to warm up on")
    unknown = vocab.unknown(tokens)
    if unknown and warn:
        shown = ", ".join(repr(t) for t in dict.fromkeys(unknown))
        print(f"warning: prefix {prefix!r}: {shown} not in the vocabulary, read as <unk>",
              file=sys.stderr)
    return torch.as_tensor(vocab.encode(tokens))


@torch.no_grad()
def generate(model: RNNLM, prefix_ids: torch.Tensor, num_tokens: int,
             temperature: float | None = None, gen: torch.Generator | None = None) -> list[int]:
    """`num_tokens` ids after the prefix: greedy when temperature is None, else sampled."""
    model.eval()
    device = next(model.parameters()).device
    logits, h = model(prefix_ids.to(device)[None], None)  # warm-up: (1, len(prefix), vocab)
    out: list[int] = []
    for _ in range(num_tokens):
        last = logits[0, -1].float()
        if temperature is None:
            nxt = int(last.argmax())
        else:
            probs = torch.softmax(last / temperature, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        logits, h = model(torch.tensor([[nxt]], device=device), h)
    return out


def continue_text(model: RNNLM, vocab: Vocab, prefix: str, num_tokens: int,
                  temperature: float | None = None, gen: torch.Generator | None = None,
                  warn: bool = True) -> str:
    """The prefix followed by its continuation, as text."""
    ids = generate(model, encode_prefix(vocab, prefix, warn), num_tokens, temperature, gen)
    sep = "" if vocab.token_type == "char" else " "
    return prefix + sep + vocab.decode(ids)
