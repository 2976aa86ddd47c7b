"""The training loop: clipping, determinism, divergence, checkpoints, sampling.
(The perplexity protocol itself: tests/training/test_evaluation.py.)"""

import copy
from pathlib import Path
from itertools import islice

import pytest
import torch
import torch.nn.functional as F

from rnnlab.config import Train
from rnnlab.data.vocab import Vocab, build_vocab
from rnnlab.errors import UserError
from rnnlab.models.lm import ModelConfig, build_model
from rnnlab.training.checkpoint import load_checkpoint, save_checkpoint
from rnnlab.training import loop, precision
from rnnlab.training.loop import new_state, run_epochs, train_step
from rnnlab.training.sampling import continue_text, prefix_tokens
from tests.conftest import shipped

VOCAB = build_vocab(list("the time traveller was expounding a recondite matter to us "))
IDS = torch.as_tensor(VOCAB.encode(list("the time traveller was expounding a recondite matter to us " * 30)))


def tiny(cell="rnn", impl="torch", seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=len(VOCAB), cell=cell, impl=impl, hidden_size=16, **kw))


def cfg(**kw):
    """params.yaml's train section with tiny settings; the constant lr these tests were written for."""
    base = dict(lr=0.01, clip_theta=1.0, num_steps=8, batch_size=4, epochs=2, optimizer="adam",
                lr_schedule="constant", device="cpu", threads=1)
    return shipped(Train, **{**base, **kw})


def train(model, c, ids=IDS):
    """run_epochs on `ids` (all of IDS unless given), validated on IDS[:200]."""
    state = new_state(model, c)
    return list(run_epochs(state, ids, IDS[:200], c, torch.device("cpu"))), state


@pytest.mark.parametrize("theta, clipped", [(0.05, True), (1e6, False)])
def test_train_step_moves_the_weights_by_lr_times_the_clipped_gradient(theta, clipped):
    """Our training step: the update (SGD) is lr x the gradient scaled to norm theta when its
    global norm is larger, the gradient itself otherwise; it returns the norm before clipping."""
    model = tiny(cell="gru")
    x, y = IDS[:32].view(4, 8), IDS[1:33].view(4, 8)
    reference = copy.deepcopy(model)  # the same loss and gradient, by hand
    loss = F.cross_entropy(reference(x)[0].flatten(0, 1), y.flatten())
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    scale = theta / float(norm) if clipped else 1.0
    assert (float(norm) > theta) == clipped
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, step_loss, step_norm = train_step(model, x, y, None, opt, theta)
    assert float(step_loss) == pytest.approx(loss.item(), rel=1e-6)
    assert float(step_norm) == pytest.approx(float(norm), rel=1e-5)
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p0 - p.detach(), 0.1 * scale * g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
@pytest.mark.parametrize("cell,impl", [("rnn", "scratch"), ("gru", "torch"), ("lstm", "torch")])
def test_training_lowers_perplexity_and_reruns_identically(cell, impl, sampling):
    c = cfg(sampling=sampling, epochs=2)
    half = IDS[: len(IDS) // 2]  # 15 times the sentence: enough to learn from in 2 epochs
    results, _ = train(tiny(cell, impl), c, half)
    again, _ = train(tiny(cell, impl), c, half)
    assert results[-1].val_ppl < results[0].val_ppl < len(VOCAB)
    for a, b in zip(results, again):
        assert (a.train_ppl, a.val_ppl, a.grad_norm) == (b.train_ppl, b.val_ppl, b.grad_norm)
    assert all(0 <= r.clipped_frac <= 1 for r in results)


def test_each_epochs_val_ppl_is_the_evaluation_protocols():
    """run_epochs scores validation by the definition of held-out perplexity (the whole split read
    left to right, one token at a time from a zero state: tests/training/test_evaluation.py's
    reference loop, not the code under test), whatever the training batches. That the evaluate
    stage reports the same number for the best checkpoint: tests/stages/test_pipeline.py."""
    from tests.training.test_evaluation import token_by_token

    for batch_size, num_steps in [(4, 8), (8, 5)]:
        results, state = train(tiny(), cfg(epochs=1, batch_size=batch_size, num_steps=num_steps))
        assert results[-1].val_ppl == pytest.approx(token_by_token(state.model, IDS[:200]), rel=1e-5)


def test_resume_from_snapshot_matches_an_uninterrupted_run():
    c = cfg(epochs=2, dropout=0.1, lr_schedule="cosine")
    full, _ = train(tiny(), c)
    state = new_state(tiny(), c)
    first = list(islice(run_epochs(state, IDS, IDS[:200], c, torch.device("cpu")), 1))
    snap = state.snapshot()
    later = new_state(tiny(seed=99), c)       # different weights, restored from the snapshot
    later.restore(snap)
    rest = list(run_epochs(later, IDS, IDS[:200], c, torch.device("cpu")))
    assert [r.val_ppl for r in first + rest] == [r.val_ppl for r in full]


def test_divergence_stops_with_epoch_and_step():
    model = tiny()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(UserError, match=r"diverged.*epoch 1, step 1.*lower train.lr"):
        train(model, cfg())


def test_batch_too_large_for_the_split_is_named():
    with pytest.raises(UserError, match=r"train.batch_size = 500.*needs at least"):
        train(tiny(), cfg(batch_size=500))


def test_checkpoint_round_trip_and_mismatches(tmp_path):
    model = tiny("lstm", num_layers=2)
    save_checkpoint(tmp_path / "best.pt", model, VOCAB, epoch=3)
    back, vocab, meta = load_checkpoint(tmp_path / "best.pt", VOCAB)
    assert meta["epoch"] == 3 and vocab == VOCAB
    x = IDS[:20][None]
    assert torch.equal(back(x)[0], model(x)[0])
    # another vocabulary
    other = build_vocab(list("abc"))
    with pytest.raises(UserError, match="another vocabulary"):
        load_checkpoint(tmp_path / "best.pt", other)
    # truncated file
    data = (tmp_path / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    # weights of another variant under this config
    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    payload["state_dict"] = tiny("gru").state_dict()
    torch.save(payload, tmp_path / "mixed.pt")
    with pytest.raises(UserError, match="do not fit the model config"):
        load_checkpoint(tmp_path / "mixed.pt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_greedy_prediction_is_deterministic_and_unknowns_warn(capsys):
    model = tiny()
    a = continue_text(model, VOCAB, "time", 10)
    assert a.startswith("time") and len(a) == 14 and a == continue_text(model, VOCAB, "time", 10)
    sampled = continue_text(model, VOCAB, "time", 10, 0.8, torch.Generator().manual_seed(0))
    assert sampled == continue_text(model, VOCAB, "time", 10, 0.8, torch.Generator().manual_seed(0))
    capsys.readouterr()
    tokens = prefix_tokens(VOCAB, "TIME")  # VOCAB: plain text, nothing is lower-cased
    assert "'T', 'I', 'M', 'E' not in the vocabulary" in capsys.readouterr().err
    assert VOCAB.encode(tokens).tolist() == [0, 0, 0, 0]
    assert continue_text(model, VOCAB, "TIME", 3, warn=False).startswith("TIME")  # as given


BOOK = Vocab(VOCAB.tokens, VOCAB.freqs, "char", normalize="book", join_lines="space")
BOOK_WORDS = build_vocab("the time traveller was here".split(), token_type="word", normalize="book")


@pytest.mark.parametrize("vocab,prefix,tokens", [
    (BOOK, "Time Traveller!", list("time traveller")),
    (BOOK, "  THE\nTime  ", list("the time")),  # lines joined with a space, as the corpus's
    (BOOK_WORDS, "Time-Traveller!", ["time", "traveller"]),
    (VOCAB, " time\n", list("time")),           # plain: only the line joining (ends stripped)
])
def test_prefixes_become_tokens_as_the_corpus_did(vocab, prefix, tokens):
    assert prefix_tokens(vocab, prefix) == tokens


def test_generated_text_starts_with_the_normalised_prefix():
    text = continue_text(tiny(), BOOK, "Time Traveller!", 5)
    assert text.startswith("time traveller") and len(text) == len("time traveller") + 5
    model = build_model(ModelConfig(len(BOOK_WORDS), "rnn", "torch", hidden_size=8))
    words = continue_text(model, BOOK_WORDS, "Time-Traveller!", 5).split(" ")
    assert words[:2] == ["time", "traveller"] and len(words) == 2 + 5


@pytest.mark.parametrize("vocab,prefix,normalize", [(BOOK, "!!!", "book"), (BOOK_WORDS, " 42 ", "book"),
                                                    (VOCAB, "  \n ", "plain"), (VOCAB, "", "plain")])
def test_a_prefix_empty_after_normalisation_is_a_user_error(vocab, prefix, normalize):
    with pytest.raises(UserError) as err:
        continue_text(tiny(), vocab, prefix, 5)
    assert str(err.value) == (f"prefix {prefix!r} is empty after the corpus's normalisation "
                              f"({normalize}): nothing to warm the model up on")


def test_checkpoint_carries_how_text_becomes_tokens(tmp_path):
    save_checkpoint(tmp_path / "best.pt", tiny(), BOOK)
    _, vocab, _ = load_checkpoint(tmp_path / "best.pt", BOOK)
    assert (vocab.token_type, vocab.normalize, vocab.join_lines) == ("char", "book", "space")
    assert vocab == BOOK and prefix_tokens(vocab, "Time!") == list("time")
    # a checkpoint from before these fields: plain text, lines joined with a space
    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    del payload["vocab"]["normalize"], payload["vocab"]["join_lines"]
    torch.save(payload, tmp_path / "old.pt")
    _, old, _ = load_checkpoint(tmp_path / "old.pt", BOOK)  # same tokens: it still loads
    assert (old.normalize, old.join_lines) == ("plain", "space")
    assert prefix_tokens(old, "time!") == list("time!")
    # an unknown normalisation is a damaged checkpoint, said so
    payload["vocab"]["normalize"] = "auto"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"vocabulary or weights are unreadable .*normalize = 'auto'"):
        load_checkpoint(tmp_path / "bad.pt")


def test_huge_but_finite_loss_is_divergence_not_a_crash():
    model = tiny()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.shape[0] == len(VOCAB):
                p.mul_(0).add_(torch.randn_like(p) * 1e4)  # enormous logits: loss ~1e4, finite
    with pytest.raises(UserError, match=r"diverged: after epoch 1"):
        train(model, cfg(optimizer="sgd", lr=1e-12))


# --- the schedules of the word-level recipes ------------------------------------------------------


def test_step_schedule_is_zarembas_decay_after_epoch_k():
    from rnnlab.training.loop import lr_at

    c = cfg(lr=1.0, epochs=13, lr_schedule="step", lr_decay=0.5, lr_decay_after=4)
    assert [lr_at(c, 0.0, e) for e in range(1, 8)] == [1, 1, 1, 1, 0.5, 0.25, 0.125]


def test_plateau_schedule_decays_after_an_epoch_that_did_not_improve(monkeypatch):
    """PyTorch's word_language_model: the rate is divided when validation stops improving; the
    decay is part of the resumable state."""
    from rnnlab.training import loop as training

    val = iter([5.0, 6.0, 4.0, 4.0])
    monkeypatch.setattr(training, "perplexity", lambda *a, **k: next(val))
    c = cfg(lr=1.0, epochs=4, optimizer="sgd", lr_schedule="plateau", lr_decay=0.25)
    results, state = train(tiny(), c, IDS[:256])  # the scores are given: any text will do
    assert [r.lr for r in results] == [1.0, 1.0, 0.25, 0.25]  # 2 and 4 did not improve
    assert state.lr_scale == 0.25 ** 2
    later = new_state(tiny(), c)
    later.restore(state.snapshot())
    assert later.lr_scale == state.lr_scale


def test_generation_leaves_out_unk_for_word_tokens_by_default():
    from rnnlab.training.sampling import continuation

    vocab = Vocab(["<unk>", "the", "cat", "<eos>"], [5, 3, 2, 1], token_type="word")
    model = build_model(ModelConfig(vocab_size=4, cell="rnn", impl="torch", hidden_size=4, embed_size=4))
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([50.0, 0.0, 10.0, 0.0]))  # <unk> by far, then "cat"
    assert continuation(model, vocab, "the", 3)[1] == " cat cat cat"
    assert continuation(model, vocab, "the", 3, exclude_unk=False)[1] == " <unk> <unk> <unk>"
    chars = Vocab(["<unk>", "a", "b", "c"], [0, 3, 2, 1], token_type="char")
    assert continuation(model, chars, "a", 2)[1] == "<unk><unk>"  # chars: kept unless asked
    assert continuation(model, chars, "a", 2, exclude_unk=True)[1] == "bb"
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 10.0]))  # then <eos>: a line break
    assert continuation(model, vocab, "the cat", 2)[1] == "\n\n"


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (False, False, False), (True, False, True), (False, True, True)])
def test_bf16_hardware_is_amx_or_avx512_bf16_on_a_cpu(amx, avx512_bf16, expected, monkeypatch):
    """Where train.bf16: auto measures at all: a CPU with AMX or AVX512-BF16."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert precision.bf16_hardware(torch.device("cpu")) is expected


def test_bf16_auto_without_the_hardware_is_float32_unmeasured(monkeypatch):
    """auto on a CPU that emulates bfloat16 trains in float32 and measures nothing; true and
    false are what they say; scores are bfloat16 only under true."""
    monkeypatch.setattr(precision, "bf16_hardware", lambda device: False)
    monkeypatch.setattr(precision.choice, "choose", lambda *a: pytest.fail("measured"))
    model, x, y = tiny("lstm"), IDS[:32].view(4, 8), IDS[1:33].view(4, 8)
    assert precision.training_bf16("auto", model, x, y) is False
    assert precision.training_bf16(True, model, x, y) is True
    assert precision.training_bf16(False, model, x, y) is False
    assert [precision.scoring_bf16(s) for s in ("auto", True, False)] == [False, True, False]


@pytest.mark.parametrize("faster", ["float32", "bfloat16"])
def test_bf16_auto_trains_in_the_precision_that_measured_faster(faster, monkeypatch):
    """auto times one step of the model each way on the first minibatch (both really run: the
    candidates leave the gradients as they were) and trains in the faster, scores in float32;
    the decision is a kernel choice, listed like the others and kept in the state."""
    monkeypatch.setattr(precision, "bf16_hardware", lambda device: True)
    ran, real_step = [], precision._step
    monkeypatch.setattr(precision, "_step", lambda *a: (ran.append(a[-1]), real_step(*a)))
    monkeypatch.setattr(precision.choice, "forced", lambda kind, key, allowed: None)
    monkeypatch.setattr(precision.choice, "measure", lambda candidates: (
        [fn() for fn in candidates.values()],
        {name: 1.0 if name == faster else 2.0 for name in candidates})[1])
    monkeypatch.setattr(precision.choice, "_store", lambda full, entry: entry)  # no cache file
    scored = []
    real_ppl = loop.perplexity
    monkeypatch.setattr(loop, "perplexity", lambda *a, **k: (scored.append(a[3]), real_ppl(*a, **k))[1])
    precision.choice.forget()
    try:
        model = tiny("lstm")
        results, state = train(model, cfg(bf16="auto", epochs=1))
        # each candidate timed once, then not again; bfloat16 warmed up once before training
        assert sorted(ran) == ([False, True, True] if faster == "bfloat16" else [False, True])
        assert state.precision == faster and state.bf16 is (faster == "bfloat16")
        assert all(p.grad is None or p.dtype == torch.float32 for p in model.parameters())
        assert scored == [False]  # the validation score: float32 either way
        assert any(line.startswith("precision lstm torch: 1 layer(s) x 16, one-hot input, "
                                   f"vocabulary {len(VOCAB)}, 8 steps x batch 4: {faster}")
                   for line in precision.choice.report())
    finally:
        precision.choice.forget()


def test_bf16_can_be_forced_by_the_environment(monkeypatch):
    """RNNLAB_PRECISION names the precision auto trains in, as RNNLAB_KERNEL names a path."""
    monkeypatch.setattr(precision, "bf16_hardware", lambda device: True)
    model, x, y = tiny("gru"), IDS[:32].view(4, 8), IDS[1:33].view(4, 8)
    for value, expected in (("bfloat16", True), ("float32", False)):
        monkeypatch.setenv("RNNLAB_PRECISION", value)
        assert precision.training_bf16("auto", model, x, y) is expected
    monkeypatch.setenv("RNNLAB_PRECISION", "fp8")
    with pytest.raises(UserError, match="RNNLAB_PRECISION = 'fp8': allowed: measure, float32, bfloat16"):
        precision.training_bf16("auto", model, x, y)


def test_bf16_trains_under_autocast_on_the_cpu(monkeypatch):
    """train.bf16: true on the CPU runs the products in bfloat16 (the fused path steps aside: no
    recurrence of rnnlab/kernels/fused.py runs), and still learns."""
    from rnnlab.kernels import fused

    monkeypatch.setattr(fused.TanhRecurrence, "apply", lambda *a: pytest.fail("fused under autocast"))
    results, state = train(tiny("rnn"), cfg(bf16=True, epochs=2))
    assert results[-1].val_ppl < results[0].val_ppl < len(VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = state.model(IDS[:8][None])
    assert logits.dtype == torch.bfloat16


BF16_RUN = """
import sys, torch
from rnnlab.models.lm import ModelConfig, build_model
from rnnlab.training import precision
from rnnlab.training.loop import train_step
torch.set_num_threads(2)
torch.manual_seed(0)
model = build_model(ModelConfig(vocab_size=11, cell="lstm", impl="torch", num_layers=2,
                                hidden_size=16, dropout=0.2))
g = torch.Generator().manual_seed(1)
x, y = (torch.randint(0, 11, (8, 16), generator=g) for _ in range(2))
if sys.argv[1] == "measured":  # what measuring the precision leaves behind: bfloat16 passes
    with torch.random.fork_rng(devices=[]):
        for _ in range(3):
            precision._step(model, x, y, None, True)
assert precision.training_bf16(True, model, x, y)
opt = torch.optim.SGD(model.parameters(), lr=1.0)
for _ in range(3):
    _, loss, _ = train_step(model, x, y, None, opt, 1.0, True)
print(repr(float(loss)))
"""


@pytest.mark.slow  # two fresh Pythons, each importing torch and paying oneDNN's first bf16 pass
def test_bf16_training_is_the_same_after_a_measurement_as_without(monkeypatch):
    """A process's first bfloat16 pass through oneDNN's LSTM computes other digits than later
    ones; the warm-up step of `training_bf16` makes a run that measured the precision (bfloat16
    passes before training) train to the very numbers of one that read it from the cache. Each
    side runs in a process of its own: the effect is once per process."""
    import subprocess
    import sys

    monkeypatch.setenv("RNNLAB_KERNEL", "reference")
    runs = [subprocess.Popen([sys.executable, "-c", BF16_RUN, how], stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parents[2])
            for how in ("cached", "measured")]
    losses = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert losses[0] == losses[1] and float(losses[0]) > 0
