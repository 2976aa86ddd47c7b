"""Text from a trained model: the book's prediction after a prefix (d2l 8.5.4), and sampling.

The prefix first becomes tokens as the corpus did (the vocabulary's normalisation and line
joining: with `book`, "Time Traveller!" is read as "time traveller"). Warm-up: those tokens are
read in one pass to build the state, then each next token is chosen from the last output (argmax
for greedy; a softmax with a temperature for sampling) and fed back.
"""

from __future__ import annotations

import sys

import torch

from rnnlab.errors import UserError
from rnnlab.models import RNNLM
from rnnlab.text import detokenize
from rnnlab.vocab import Vocab


def prefix_tokens(vocab: Vocab, prefix: str, warn: bool = True) -> list[str]:
    """The prefix as tokens, made as the corpus's were; tokens unseen in training are kept (they
    are read as <unk>), with a warning. Nothing left after normalisation is a UserError."""
    tokens = vocab.text_tokens(prefix)
    if not tokens:
        raise UserError(f"prefix {prefix!r} is empty after the corpus's normalisation "
                        f"({vocab.normalize}): nothing to warm the model up on")
    unknown = vocab.unknown(tokens)
    if unknown and warn:
        shown = ", ".join(repr(t) for t in dict.fromkeys(unknown))
        print(f"warning: prefix {prefix!r}: {shown} not in the vocabulary, read as <unk>",
              file=sys.stderr)
    return tokens


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
    """The normalised prefix followed by its continuation, as text."""
    tokens = prefix_tokens(vocab, prefix, warn)
    ids = generate(model, torch.as_tensor(vocab.encode(tokens)), num_tokens, temperature, gen)
    return detokenize(tokens + [vocab.tokens[i] for i in ids], vocab.token_type)
