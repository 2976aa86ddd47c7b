"""Held-out perplexity: one protocol for every variant (docs/evaluation.md), and the evaluate
stage's checks of its prefixes.

The protocol reads a split as one sequence with the state carried, every token after the first
predicted once; the known answers are a uniform model (= the vocabulary size) and a reference
loop that feeds one token at a time.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rnnlab.data.vocab import build_vocab
from rnnlab.models.lm import ModelConfig, build_model
from rnnlab.training.loop import perplexity, streamed_perplexity
from tests.stagerun import eval_args, in_process, one_error, tiny_params, write_params

VOCAB = build_vocab(list("the time traveller was expounding a recondite matter to us "))
IDS = torch.as_tensor(VOCAB.encode(list("the time traveller was expounding a recondite matter to us " * 5)))
CELLS = ["rnn", "gru", "lstm"]
IMPLS = ["scratch", "torch"]


def tiny(cell: str, impl: str, num_layers: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=len(VOCAB), cell=cell, impl=impl, hidden_size=16,
                                   num_layers=num_layers))


def token_by_token(model, ids: torch.Tensor, reset_every: int = 0) -> float:
    """The definition, one token at a time: exp(mean -log p(x_t+1 | x_1..x_t)), t = 1..n-1.
    reset_every > 0: the state is lost every so many tokens (what the protocol must not do)."""
    h, nll = None, 0.0
    with torch.no_grad():
        for t in range(len(ids) - 1):
            if reset_every and t % reset_every == 0:
                h = None
            logits, h = model(ids[t : t + 1][None], h)  # (1, 1, vocab)
            nll -= float(torch.log_softmax(logits[0, -1].double(), dim=-1)[ids[t + 1]])
    return math.exp(nll / (len(ids) - 1))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_model_perplexity_is_vocab_size(cell, impl):
    model = tiny(cell, impl)
    with torch.no_grad():
        model.head.weight.zero_()  # every logit equal: p = 1 / |V| for every token
        model.head.bias.zero_()
    assert perplexity(model, IDS) == pytest.approx(len(VOCAB), rel=1e-6)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_perplexity_equals_a_token_by_token_loop(cell, impl, num_layers):
    model = tiny(cell, impl, num_layers).double()
    ids = IDS[:150]  # 149 predictions
    expected = token_by_token(model, ids)
    lost = token_by_token(model, ids, reset_every=7)
    assert abs(lost / expected - 1) > 1e-6  # a lost state shows
    # chunks of 7 and of 64 (the last one short in each), and the whole split in one
    for chunk in (7, 64, len(ids)):
        assert perplexity(model, ids, chunk=chunk) == pytest.approx(expected, rel=1e-9, abs=0)


@pytest.mark.parametrize("streams, context", [(4, 8), (7, 3), (16, 5)])
def test_streamed_perplexity_scores_every_prediction_once(streams, context):
    """The training split's reading in streams: with a state that forgets at once (no recurrent
    weight: each prediction depends on its input token alone) it equals the one-sequence number,
    so each of the n - 1 predictions counts exactly once, whatever the streams and the padding."""
    model = tiny("rnn", "torch").double()
    with torch.no_grad():
        model.rnn.rnn.weight_hh_l0.zero_()
    expected = perplexity(model, IDS)
    got = streamed_perplexity(model, IDS, streams=streams, context=context, chunk=13)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("cell", CELLS)
def test_streamed_perplexity_is_near_the_one_sequence_number(cell):
    """With memory, each stream starts from `context` tokens of the text before it: the number
    moves by less than a part in a thousand; without that context (each stream cold) more;
    a split too short for the streams is read as one sequence."""
    model = tiny(cell, "torch").double()
    ids = IDS.repeat(8)
    exact = perplexity(model, ids)
    warm = streamed_perplexity(model, ids, streams=8, context=64)
    assert warm == pytest.approx(exact, rel=1e-3)
    cold = streamed_perplexity(model, ids, streams=8, context=0)
    assert abs(cold / exact - 1) > abs(warm / exact - 1)
    assert streamed_perplexity(model, IDS, streams=8, context=64) == pytest.approx(perplexity(model, IDS), rel=1e-12)


def test_perplexity_restores_training_mode_and_needs_two_tokens():
    model = tiny("lstm", "torch")
    model.train()
    perplexity(model, IDS)
    assert model.training
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, IDS[:1])


# ---------------------------------------------------------------------------------------------
# the evaluate stage, run for real


@pytest.mark.slow  # evaluates twice
def test_variants_differing_only_in_batch_size_are_scored_on_the_same_predictions(tmp_path, tiny_tokens,
                                                                                   tiny_trained):
    """One checkpoint, evaluated under params whose variant differs only in train.batch_size and
    train.num_steps: the same perplexities on every split, from the same number of predictions,
    and the validation perplexity is train.json's best (run_epochs uses the same protocol)."""
    data, model = tiny_tokens, tiny_trained / "models" / "rnn"  # trained with tiny_params()
    metrics = {}
    for batch_size, num_steps in [(4, 8), (32, 5)]:
        folder = tmp_path / f"b{batch_size}"
        folder.mkdir()
        write_params(folder, tiny_params(train={"batch_size": batch_size, "num_steps": num_steps}))
        in_process("evaluate", *eval_args(folder, data, model), cwd=folder, check=True)
        metrics[batch_size] = json.loads((folder / "metrics" / "rnn.json").read_text())
    a, b = metrics.values()
    sizes = {s: len(np.load(data / f"{s}.npy")) for s in ("train", "val", "test")}
    for s in ("train", "val", "test"):
        assert a[f"{s}_ppl"] == b[f"{s}_ppl"]
        assert a[f"{s}_tokens"] == b[f"{s}_tokens"] == sizes[s] - 1
    assert a["val_ppl"] == json.loads((model / "train.json").read_text())["best_val_ppl"]


@pytest.mark.slow  # needs the session's trained models
def test_a_prefix_empty_after_normalisation_stops_evaluate_before_any_work(tmp_path, tiny_trained, tiny_tokens):
    write_params(tmp_path, tiny_params(evaluate={"prefixes": ["time traveller", "!!!"]}))
    proc = in_process("evaluate", *eval_args(tmp_path, tiny_tokens, tiny_trained / "models/rnn"), cwd=tmp_path)
    assert one_error(proc) == ("error: prefix '!!!' is empty after the corpus's normalisation (book): "
                               "nothing to warm the model up on")
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "samples").exists()
