"""The benchmark: FLOP counts by hand, the book's and word_language_model's baselines compute our
models' function, a smoke run of the whole command. No timing is asserted anywhere."""

from __future__ import annotations

import json
import math
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import benchmark, report, sides, streams
from bench.baselines import BookScratchRNN, book_model, grad_clipping
from bench.flops import bound_tokens_per_sec, forward_flops, train_flops
from bench.wlm import WordLM, batchify, get_batch, wlm_step
from rnnlab.models.dispatch import detach_state
from rnnlab.models.lm import CELLS, ModelConfig, build_model
from rnnlab.training import loop as training

# --- FLOPs per token ------------------------------------------------------------------------------


def test_flops_of_a_tiny_rnn_by_hand():
    """vocab 3, hidden 2, one layer, one-hot input: per token h W_hh (2x2: 2*2*2 = 8 FLOPs) and the
    output layer (2x3: 2*2*3 = 12); the input is a row lookup (0), the book's one-hot product
    one_hot (1x3) @ W_xh (3x2) would be 2*3*2 = 12. Training: three times the forward."""
    cfg = ModelConfig(vocab_size=3, cell="rnn", impl="torch", hidden_size=2)
    assert forward_flops(cfg) == {"input": 0, "recurrent": 8, "output": 12}
    assert train_flops(cfg) == 60
    assert forward_flops(cfg, one_hot_matmul=True)["input"] == 12
    assert train_flops(cfg, one_hot_matmul=True) == 96


def test_flops_of_a_two_layer_lstm_by_hand():
    """vocab 5, hidden 3, 4 gates (width 12): layer 1 recurrent 2*3*12 = 72, layer 2 input 72 and
    recurrent 72, output 2*3*5 = 30: 246 forward, 738 training."""
    cfg = ModelConfig(vocab_size=5, cell="lstm", impl="torch", hidden_size=3, num_layers=2)
    assert forward_flops(cfg) == {"input": 72, "recurrent": 144, "output": 30}
    assert train_flops(cfg) == 738


def test_flops_of_a_gru_with_an_embedding_by_hand():
    """vocab 3, embed 4, hidden 2, 3 gates (width 6): input 2*4*6 = 48 (an embedding is a real
    product), recurrent 2*2*6 = 24, output 2*2*3 = 12."""
    cfg = ModelConfig(vocab_size=3, cell="gru", impl="scratch", hidden_size=2, embed_size=4)
    assert forward_flops(cfg) == {"input": 48, "recurrent": 24, "output": 12}
    assert forward_flops(cfg, one_hot_matmul=True) == forward_flops(cfg)  # no one-hot to count
    assert train_flops(cfg) == 252


def test_the_book_settings_count():
    """The Time Machine (vocab 28), 256 hidden: the numbers the benchmark's table shows."""
    counts = {cell: train_flops(ModelConfig(vocab_size=28, cell=cell, impl="torch"))
              for cell in CELLS}
    assert counts == {"rnn": 3 * (2 * 256 * 256 + 2 * 256 * 28),
                      "gru": 3 * (2 * 256 * 768 + 2 * 256 * 28),
                      "lstm": 3 * (2 * 256 * 1024 + 2 * 256 * 28)}


def test_flops_of_the_word_lstm_by_hand():
    """Zaremba et al.'s small LSTM (embedding 200, 2 x 200 hidden, vocab 10,000; width 4*200 = 800):
    input 2*200*800 per layer (the embedding feeds the first), recurrent the same per layer, the
    10,000-wide head 2*200*10000. The head is three quarters of the FLOPs."""
    cfg = sides.word_config(10_000)
    assert forward_flops(cfg) == {"input": 640_000, "recurrent": 640_000, "output": 4_000_000}
    assert train_flops(cfg) == 15_840_000
    assert streams.word_shapes(cfg, batch=20, num_steps=20) == {
        "input": (400, 200, 800), "recurrent": (20, 200, 800), "output": (400, 200, 10_000)}


def test_the_speed_bound_is_flops_per_second_over_flops_per_token():
    assert bound_tokens_per_sec(flops_per_token=500, flops_per_sec=1e9) == 2e6


# --- the baseline computes what our models compute ------------------------------------------------


def test_book_grad_clipping_is_clip_grad_norm():
    """The book's clipping (sqrt of the summed squares, then scale) and nn.utils.clip_grad_norm_
    leave the same gradients (clip_grad_norm_ adds 1e-6 to the norm)."""
    torch.manual_seed(0)
    nets = [nn.Linear(4, 3), nn.Linear(4, 3)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(5, 4)
    for net in nets:
        (net(x) ** 2).sum().backward()
    grad_clipping(nets[0], 1.0)
    norm = nn.utils.clip_grad_norm_(nets[1].parameters(), 1.0)
    assert norm > 1  # it did clip
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=0)


def _logits_and_state(model, idx, book_state):
    """Our model's logits as the book lays them out: (steps * batch, vocab), time-major."""
    logits, state = model(idx, tuple(s if s.dim() == 3 else s[None] for s in book_state))
    return logits.transpose(0, 1).reshape(-1, logits.shape[-1]), state


@pytest.mark.parametrize("cell", CELLS)
def test_book_rnnmodel_is_our_torch_impl(cell):
    """d2l's RNNModel(nn.RNN / GRU / LSTM) and our torch impl with its weights: the same logits."""
    torch.manual_seed(0)
    book = book_model(cell, 7, 5, num_layers=2)  # float32: RNNModel makes its one-hot float32
    ours = build_model(ModelConfig(vocab_size=7, cell=cell, impl="torch", hidden_size=5,
                                   num_layers=2))
    ours.load_state_dict({**{f"rnn.rnn.{k}": v for k, v in book.rnn.state_dict().items()},
                          "head.weight": book.linear.weight, "head.bias": book.linear.bias})
    idx = torch.randint(0, 7, (3, 4))
    state = book.begin_state(device="cpu", batch_size=3)
    state = tuple(s + 0.1 for s in (state if isinstance(state, tuple) else (state,)))
    book_logits, _ = book(idx, state if cell == "lstm" else state[0])
    logits, _ = _logits_and_state(ours, idx, state)
    torch.testing.assert_close(logits, book_logits, rtol=1e-5, atol=1e-6)


def test_book_scratch_rnn_is_our_scratch_rnn():
    """d2l 8.5's rnn() and our scratch rnn with its weights: the same logits and state."""
    torch.manual_seed(0)
    book = BookScratchRNN(7, 5)
    W_xh, W_hh, b_h, W_hq, b_q = book.params
    ours = build_model(ModelConfig(vocab_size=7, cell="rnn", impl="scratch", hidden_size=5))
    ours.load_state_dict({"rnn.cells.0.W_xh": W_xh, "rnn.cells.0.W_hh": W_hh,
                          "rnn.cells.0.b_h": b_h, "head.weight": W_hq.T, "head.bias": b_q})
    idx = torch.randint(0, 7, (3, 4))
    h0 = torch.randn(3, 5)
    book_logits, (book_h,) = book(idx, (h0,))
    logits, (h,) = _logits_and_state(ours, idx, (h0,))
    torch.testing.assert_close(logits, book_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h[0], book_h, rtol=1e-5, atol=1e-6)


# --- word_language_model's baseline -------------------------------------------------------------


def test_batchify_and_get_batch_lay_out_the_stream_time_major():
    """The example's own picture: the alphabet in 4 columns, then with bptt 2 the first chunk and
    its targets, one row down and flattened."""
    source = batchify(torch.arange(26), 4)  # a..x, y z dropped
    assert source.shape == (6, 4)
    assert source[:, 0].tolist() == [0, 1, 2, 3, 4, 5] and source[0].tolist() == [0, 6, 12, 18]
    data, targets = get_batch(source, 0, 2)
    assert data.tolist() == [[0, 6, 12, 18], [1, 7, 13, 19]]
    assert targets.tolist() == [1, 7, 13, 19, 2, 8, 14, 20]
    assert get_batch(source, 4, 2)[0].shape == (1, 4)  # the last chunk is shorter


def test_both_sides_get_the_same_tokens():
    """word_minibatches: ours (batch, steps) is wlm's (steps, batch) transposed, targets too; full
    chunks only, and epoch after epoch when more are asked for than the stream holds."""
    ids = torch.arange(1000)
    wlm, ours = streams.word_minibatches(ids, batch_size=4, num_steps=5, count=60)
    assert len(wlm) == len(ours) == 60
    for (data, targets), (x, y) in zip(wlm, ours, strict=True):
        assert data.shape == (5, 4) and targets.shape == (20,) and x.shape == y.shape == (4, 5)
        assert torch.equal(x, data.t()) and torch.equal(y, targets.view(5, 4).t())
        assert torch.equal(y[:, :-1], x[:, 1:])  # y is x one token on
    # 1000 tokens: 250 rows of 4, 49 full chunks of 5 (the 50th would need row 250)
    assert torch.equal(wlm[0][0], wlm[49][0]) and not torch.equal(wlm[0][0], wlm[48][0])


def test_ptb_ids_numbers_words_by_frequency(tmp_path):
    """<eos> after every line; the most frequent word 0, ties in order of first appearance."""
    path = tmp_path / "ptb.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ptb/ptb.train.txt", " the cat <unk>\n the dog\n")
    # the 2, <eos> 2, cat 1, <unk> 1, dog 1
    assert streams.ptb_ids(path).tolist() == [0, 2, 3, 1, 0, 4, 1]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("other.txt", "a")
    with pytest.raises(SystemExit, match="no ptb/ptb.train.txt"):
        streams.ptb_ids(path)


def test_zipf_ids_are_reproducible_and_fall_as_one_over_the_rank():
    """Reproducible, within the vocabulary, frequencies falling with the id as 1 / (id + 1)."""
    ids = streams.zipf_ids(20_000, 100)
    assert torch.equal(ids, streams.zipf_ids(20_000, 100))
    assert 0 <= ids.min() and ids.max() < 100
    counts = torch.bincount(ids, minlength=100).double()
    assert counts[0] / counts[1] == pytest.approx(2, rel=0.1)  # P(0) / P(1) = 2
    assert counts[0] / counts[9] == pytest.approx(10, rel=0.25)


def _ours_from_wlm(wlm: WordLM) -> dict:
    """wlm's weights under our names: encoder -> embedding, rnn -> rnn.rnn, decoder -> head."""
    prefixes = {"encoder.": "embedding.", "rnn.": "rnn.rnn.", "decoder.": "head."}
    return {prefixes[k[: k.index(".") + 1]] + k[k.index(".") + 1 :]: v.clone()
            for k, v in wlm.state_dict().items()}


def test_wlm_initial_loss_is_log_vocab_then_falls():
    """Known answer: with the decoder zeroed the example's model is uniform, loss log(V) exactly;
    then its training step learns a repeating stream 0 1 2 3 4 0 1 ... (the loss falls below a
    third of that in 100 minibatches; one layer: two of small weights learn slowly under SGD)."""
    torch.manual_seed(0)
    wlm = WordLM(ntoken=5, ninp=16, nhid=16, nlayers=1, dropout=0.0)
    nn.init.zeros_(wlm.decoder.weight)
    source = batchify(torch.arange(5).repeat(100), 4)  # (125, 4)
    step = wlm_step(wlm, lr=1.0, clip=1.0)
    losses = [step(*get_batch(source, i % 120, 5)) for i in range(0, 500, 5)]
    assert losses[0] == pytest.approx(math.log(5), abs=1e-6)
    assert losses[-1] < losses[0] / 3


@pytest.mark.parametrize("vocab", [50, 10_000])  # ours scores the two by different routes
def test_wlm_and_ours_train_alike(vocab):
    """wlm's step and ours (rnnlab.training.train_step, SGD) from the same weights, on the same
    tokens, state carried: the same loss at every step and the same weights after it (gradients,
    clipping at 0.25 and the lr 20 update agree), so the benchmark times the same work."""
    torch.manual_seed(0)
    wlm = WordLM(ntoken=vocab, ninp=8, nhid=6, nlayers=2, dropout=0.0)
    ours = build_model(ModelConfig(vocab_size=vocab, cell="lstm", impl="torch", num_layers=2,
                                   hidden_size=6, embed_size=8))
    ours.load_state_dict(_ours_from_wlm(wlm))
    wlm_batches, our_batches = streams.word_minibatches(streams.zipf_ids(400, vocab),
                                                          batch_size=4, num_steps=5, count=3)
    step = wlm_step(wlm, lr=20.0, clip=0.25)
    opt = torch.optim.SGD(ours.parameters(), lr=20.0)
    h, norms = None, []
    for (data, targets), (x, y) in zip(wlm_batches, our_batches, strict=True):
        wlm_loss = step(data, targets)
        h = None if h is None else detach_state(h)  # detach: truncate BPTT
        h, loss, norm = training.train_step(ours, x, y, h, opt, 0.25)
        norms.append(float(norm))
        assert float(loss) == pytest.approx(wlm_loss, rel=1e-5)
        for name, value in _ours_from_wlm(wlm).items():
            torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    assert max(norms) > 0.25  # the clipping was exercised


def test_markdown_table_has_every_column():
    """The report of a made-up result: one row per side, every column, and the extras."""
    side = {"median": 2e5, "min": 1.5e5, "max": 2.5e5, "repeats": [2e5]}
    result = {
        "date": "2026-01-01T00:00:00", "command": "python -m bench.benchmark", "vocab_size": 28,
        "machine": {"host": "h", "cpu": "CPU", "threads": 2, "torch": "2", "onednn": True,
                    "commit": "abc", "dirty": False, "device": "cpu", "cores": 2,
                    "load_average": 0.1, "load_average_before": 0.2},
        "settings": {"steps": 2, "repeats": 2, "tracking_variant": "rnn"},
        "matmul": [{"m": 32, "k": 256, "n": 256, "mkl": 100.0, "onednn": 150.0, "best": 150.0}],
        "matmul_bf16": [{"m": 32, "k": 256, "n": 256, "mkl": 90.0, "onednn": 310.0, "best": 310.0}],
        "training": [{"variant": "rnn", "batch": 32, "baseline": "d2l RNNModel(nn.RNN)",
                      "flops_per_token": 436224, "book": side, "ours": side, "ratio": 1.5,
                      "bound": 3e5, "bound_bf16": 6e5},
                     {"variant": "lstm", "batch": 32, "baseline": "d2l RNNModel(nn.LSTM)",
                      "flops_per_token": 1e6, "book": side, "ours": side, "ours_bf16": side,
                      "ratio": 1.1, "ratio_bf16": 1.7, "bound": 3e5, "bound_bf16": 8e5}],
        "word": {"data": "a synthetic Zipf stream", "settings": sides.WORD, "training": [
            {"variant": "word lstm", "batch": 20, "baseline": "wlm RNNModel(LSTM)",
             "config": {"vocab_size": 10_000}, "flops_per_token": 15_840_000, "book": side,
             "ours": side, "ratio": 0.9, "bound": 3e5, "bound_bf16": 6e5,
             "shapes": {"output": (400, 200, 10_000)}}]},
        "inference": {"rnn": {"greedy_chars_per_sec": 1e4, "sampled_chars_per_sec": 9e3,
                              "eval_tokens_per_sec": 4e5}},
        "dvc": {"first_repro_seconds": 9.0, "noop_repro_seconds": 0.5, "noop_ran_a_stage": False},
        "tracking": {"record_curves_seconds_median": 0.03, "record_summary_seconds": 0.02,
                     "epoch_seconds": 1.0, "batches_per_epoch": 76, "epochs": 12,
                     "share_of_training": 0.03, "share_with_run_start_and_end": 0.1,
                     "run_start_seconds": 0.02, "run_end_seconds": 1.0},
    }
    text = report.markdown(result)
    header = next(line for line in text.splitlines() if line.startswith("| variant | batch"))
    assert header.split("|")[1:-1] == [f" {c} " for c in report.TABLE_COLUMNS]
    rows = [line for line in text.splitlines() if line.startswith("| rnn | 32 |")]
    assert len(rows) == 2 and all(len(r.split("|")) == len(header.split("|")) for r in rows)
    lstm = [line for line in text.splitlines() if line.startswith("| lstm | 32 |")]
    assert [r.split("|")[3].strip() for r in lstm] == ["d2l RNNModel(nn.LSTM)", "ours", "ours bf16"]
    assert "| 1.70x |" in lstm[2] and "| 800.0k | 25% |" in lstm[2]  # its bound: bfloat16's
    assert "| 300.0k | 67% |" in lstm[1]
    word = [line for line in text.splitlines() if line.startswith("| word lstm | 20 |")]
    assert len(word) == 2 and all(len(r.split("|")) == len(header.split("|")) for r in word)
    assert "| wlm RNNModel(LSTM) |" in word[0] and "| ours |" in word[1] and "| 0.90x |" in word[1]
    assert "output 400 x 200 @ 200 x 10000" in text
    assert "| 150 |" in text and "| 310 |" in text and "No-op `dvc repro`: 0.50 s" in text and "Tracking:" in text


# --- the command ----------------------------------------------------------------------------------


def _tiny_ptb(path):
    """A zip laid out as PTB's: 30 lines of 15 words over a vocabulary of 40 (480 tokens)."""
    words = [f"w{(7 * i) % 39}" for i in range(30 * 15)]
    lines = [" ".join(words[i : i + 15]) for i in range(0, len(words), 15)]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ptb/ptb.train.txt", "\n".join(lines) + "\n")
    return path


@pytest.mark.slow  # the benchmark's command, end to end
def test_word_only_quick_run(tmp_path):
    """`--word-only --quick --ptb --bf16`: only the word rows, on the zip's words, ours also under
    bfloat16 autocast (a third side, on any CPU), written to the table and the JSON (no speed is
    checked; the ratios are finite and positive)."""
    ptb = _tiny_ptb(tmp_path / "ptb.zip")
    benchmark.main(["--word-only", "--quick", "--steps", "1", "--threads", "1", "--ptb", str(ptb),
                    "--bf16", "--out", str(tmp_path / "out")])
    (md,) = (tmp_path / "out").glob("*.md")
    (js,) = (tmp_path / "out").glob("*.json")
    text = md.read_text()
    assert sum(line.startswith("| word lstm | 20 |") for line in text.splitlines()) == 3
    assert "Time Machine" not in text and "ptb.zip: 480 tokens, 40 words" in text
    result = json.loads(js.read_text())
    assert result["training"] == [] and "inference" not in result and "tracking" not in result
    (p,) = result["word"]["training"]
    assert p["config"]["vocab_size"] == 40 and p["flops_per_token"] == train_flops(
        sides.word_config(40))
    assert math.isfinite(p["ratio"]) and p["ratio"] > 0 and 0 < p["bound"] <= p["bound_bf16"]
    assert len(p["book"]["repeats"]) == len(p["ours"]["repeats"]) == len(p["ours_bf16"]["repeats"]) == 2
    assert math.isfinite(p["ratio_bf16"]) and p["ratio_bf16"] > 0


def test_word_only_rejects_variants():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--word-only", "--variants", "rnn"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--word-only", "--skip-word"])


@pytest.mark.slow
def test_quick_run_writes_the_table(tmp_path):
    """`--quick` end to end on two variants and the word rows (synthetic words, vocab 10,000):
    the table file and its JSON are written with every column and every extra but the no-op
    `dvc repro` (its own test below; no speed is checked)."""
    benchmark.main(["--quick", "--variants", "rnn", "lstm", "--threads", "1", "--skip-dvc",
                    "--out", str(tmp_path)])
    (md,) = tmp_path.glob("*.md")
    (js,) = tmp_path.glob("*.json")
    text = md.read_text()
    assert "| " + " | ".join(report.TABLE_COLUMNS) + " |" in text
    result = json.loads(js.read_text())
    pairs = {p["variant"]: p for p in [*result["training"], *result["word"]["training"]]}
    for variant, batch in (("rnn", 32), ("lstm", 32), ("word lstm", 20)):  # + ours bf16 where auto picks it
        assert sum(line.startswith(f"| {variant} | {batch} |") for line in text.splitlines()) == \
            2 + bool(pairs[variant].get("ours_bf16"))
    assert [(p["variant"], p["batch"]) for p in result["training"]] == [("rnn", 32), ("lstm", 32)]
    for p in result["training"]:
        assert p["ratio"] > 0 and p["bound"] > 0 and p["flops_per_token"] > 0
        for side in ("book", "ours", "ours_bf16"):
            if side in p:
                assert p[side]["min"] <= p[side]["median"] <= p[side]["max"]
                # the bound is one: every FLOP at the machine's best rate cannot be beaten
                assert p[side]["median"] < p["bound_bf16" if side == "ours_bf16" else "bound"]
    (w,) = result["word"]["training"]
    assert w["config"]["vocab_size"] == 10_000 and w["flops_per_token"] == 15_840_000
    assert math.isfinite(w["ratio"]) and w["ratio"] > 0 and w["bound"] > 0
    assert set(result["inference"]) == {"rnn", "lstm"}
    assert "dvc" not in result and 0 < result["tracking"]["share_of_training"]


@pytest.mark.slow
def test_a_second_repro_runs_nothing_and_is_timed(pipeline, tmp_path):
    """The benchmark's no-op `dvc repro`, on a copy of the session's tiny pipeline (already
    reproduced, as noop_repro_seconds' first repro leaves its clone)."""
    from bench.extras import timed_repro
    from tests.repos import user_env

    repo = pipeline.copy(tmp_path / "repo")
    seconds, out = timed_repro(repo, user_env(repo), str(Path(sys.executable).parent / "dvc"))
    assert seconds > 0 and "Running stage" not in out and "up to date" in out


def test_bf16_matmul_rates_without_bf16_hardware(monkeypatch):
    """Where the CPU has no bfloat16 hardware, oneDNN's linear is not asked for a bfloat16
    primitive (it has none there): torch.mm's rate only, and the row says why."""
    from bench import timing
    monkeypatch.setattr(timing, "bf16_hardware", lambda device: False)
    (row,) = timing.matmul_rates([(8, 16, 32)], 0.01, dtype=torch.bfloat16)
    assert "onednn" not in row and row["onednn_skipped"] == timing.NO_BF16_ONEDNN
    assert row["best"] == row["mkl"] > 0
    (f32,) = timing.matmul_rates([(8, 16, 32)], 0.01)  # float32: oneDNN as before
    assert "onednn_skipped" not in f32 and ("onednn" in f32) == timing.onednn_available()


def test_bf16_matmul_rates_with_bf16_hardware(monkeypatch):
    """Where it has, oneDNN's linear is timed in bfloat16 (the op is replaced by a counting one,
    so that this runs on any CPU)."""
    from bench import timing
    calls = []

    class Ops:  # torch.ops.mkldnn stand-in: records the dtype it was called with
        @staticmethod
        def _linear_pointwise(a, w, *rest):
            calls.append(a.dtype)
            return a @ w.t()

    monkeypatch.setattr(timing, "bf16_hardware", lambda device: True)
    monkeypatch.setattr(timing, "onednn_available", lambda: True)
    monkeypatch.setattr(timing.torch.ops, "mkldnn", Ops)
    (row,) = timing.matmul_rates([(8, 16, 32)], 0.01, dtype=torch.bfloat16)
    assert row["onednn"] > 0 and "onednn_skipped" not in row
    assert calls and set(calls) == {torch.bfloat16}
