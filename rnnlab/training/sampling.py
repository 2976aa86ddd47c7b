"""Text from a trained model: the book's prediction after a prefix (d2l 8.5.4), and sampling.

The prefix becomes tokens as the corpus did (with `book`, "Time Traveller!" is read as "time
traveller"), read in one pass to build the state; then each next token is chosen from the last
output (argmax for greedy; a softmax with a temperature, over the `top_k` likeliest if set, for
sampling) and fed back. Generation never chooses `<unk>` when asked to (`exclude_unk`; by default
for word tokens, where a greedy model would repeat it), and shows `<eos>` as a line break.

`Options` holds the defaults of text generation outside the pipeline (`rnnlab generate`, the
MLflow Model's `predict`): the pipeline's own come from params.yaml's `evaluate` section.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from rnnlab.config import Evaluate
from rnnlab.data.text import detokenize
from rnnlab.data.vocab import UNK, Vocab
from rnnlab.errors import UserError
from rnnlab.models.lm import RNNLM


MIN_TEMPERATURE = 1e-3  # below it the softmax of logits / temperature overflows to inf / inf


@dataclass(frozen=True)
class Options:
    """How to continue a prefix: greedy when temperature is 0, else sampled (seeded)."""

    num_tokens: int = 50     # tokens to generate (>= 1)
    temperature: float = 0.0  # 0: greedy (argmax); > 0: softmax temperature of sampling
    top_k: int = 0           # sample among the k likeliest tokens only; 0: all
    seed: int = 0            # seed of the sampling (>= 0)
    exclude_unk: bool | None = None  # never generate <unk>; None: for word tokens only

    def __post_init__(self) -> None:
        problems = [f"{name} = {value!r}: {rule}" for name, value, ok, rule in (
            ("num_tokens", self.num_tokens, _int(self.num_tokens) and self.num_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature, _num(self.temperature) and (
                self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < float("inf")),
             f"0 (greedy) or a number >= {MIN_TEMPERATURE:g}"),
            ("top_k", self.top_k, _int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0: all tokens)"),
            ("seed", self.seed, _int(self.seed) and 0 <= self.seed < 2**63, "an integer >= 0 and < 2**63"),
            ("exclude_unk", self.exclude_unk, self.exclude_unk is None or isinstance(self.exclude_unk, bool),
             "true, false or null (null: for word tokens)"),
        ) if not ok]
        if problems:
            raise UserError("\n".join(problems))


def excludes_unk(vocab: Vocab, setting: bool | str | None) -> bool:
    """Whether generation leaves <unk> out: `auto` / None means for word tokens only."""
    return vocab.token_type == "word" if setting in ("auto", None) else bool(setting)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


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
             temperature: float | None = None, gen: torch.Generator | None = None,
             top_k: int = 0, exclude: tuple[int, ...] = ()) -> list[int]:
    """`num_tokens` ids after the prefix: greedy when temperature is None, else sampled (among
    the `top_k` likeliest tokens when top_k > 0); never an id of `exclude`."""
    model.eval()
    device = next(model.parameters()).device
    logits, h = model(prefix_ids.to(device)[None], None)  # warm-up: (1, len(prefix), vocab)
    out: list[int] = []
    for _ in range(num_tokens):
        last = logits[0, -1].float()
        if exclude:
            last[list(exclude)] = -torch.inf
        if temperature is None:
            nxt = int(last.argmax())
        else:
            if 0 < top_k < len(last):
                kth = torch.topk(last, top_k).values[-1]
                last = last.masked_fill(last < kth, -torch.inf)
            probs = torch.softmax(last / temperature, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        logits, h = model(torch.tensor([[nxt]], device=device), h)
    return out


def continuation(model: RNNLM, vocab: Vocab, prefix: str, num_tokens: int,
                 temperature: float | None = None, gen: torch.Generator | None = None,
                 top_k: int = 0, warn: bool = True,
                 exclude_unk: bool | str | None = None) -> tuple[str, str]:
    """(the prefix as the model read it, normalised; its continuation), as text. exclude_unk:
    True, False, or None / "auto" (for word tokens only)."""
    tokens = prefix_tokens(vocab, prefix, warn)
    exclude = (vocab.index[UNK],) if excludes_unk(vocab, exclude_unk) else ()
    ids = generate(model, torch.as_tensor(vocab.encode(tokens)), num_tokens, temperature, gen,
                   top_k, exclude)
    read = detokenize(tokens, vocab.token_type)
    return read, detokenize(tokens + [vocab.tokens[i] for i in ids], vocab.token_type)[len(read):]


def continue_text(model: RNNLM, vocab: Vocab, prefix: str, num_tokens: int,
                  temperature: float | None = None, gen: torch.Generator | None = None,
                  warn: bool = True, exclude_unk: bool | str | None = None) -> str:
    """The normalised prefix followed by its continuation, as text."""
    return "".join(continuation(model, vocab, prefix, num_tokens, temperature, gen, warn=warn,
                                exclude_unk=exclude_unk))


def prefix_samples(model: RNNLM, vocab: Vocab, ev: Evaluate) -> dict[str, dict]:
    """The evaluate stage's texts: {prefix: {"greedy": text, "sampled": [text, ...]}} for each
    of ev.prefixes, ev.num_samples sampled texts each, drawn in order from one generator seeded
    with ev.seed."""
    gen = torch.Generator().manual_seed(ev.seed)
    return {
        prefix: {
            "greedy": continue_text(model, vocab, prefix, ev.num_tokens,
                                    exclude_unk=ev.exclude_unk),
            "sampled": [continue_text(model, vocab, prefix, ev.num_tokens, ev.temperature, gen,
                                      warn=False, exclude_unk=ev.exclude_unk)
                        for _ in range(ev.num_samples)],
        }
        for prefix in ev.prefixes
    }
