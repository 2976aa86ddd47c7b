"""The benchmark: FLOP counts by hand, the book's baseline computes our models' function, a smoke
run of the whole command. No timing is asserted anywhere."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bench import benchmark
from bench.baselines import BookScratchRNN, book_model, grad_clipping
from bench.flops import bound_tokens_per_sec, forward_flops, train_flops
from rnnlab.models import CELLS, ModelConfig, build_model

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


def test_bound():
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
        "training": [{"variant": "rnn", "batch": 32, "baseline": "d2l RNNModel(nn.RNN)",
                      "flops_per_token": 436224, "book": side, "ours": side, "ratio": 1.5,
                      "bound": 3e5, "peak_bound": 6e5}],
        "inference": {"rnn": {"greedy_chars_per_sec": 1e4, "sampled_chars_per_sec": 9e3,
                              "eval_tokens_per_sec": 4e5}},
        "dvc": {"first_repro_seconds": 9.0, "noop_repro_seconds": 0.5, "noop_ran_a_stage": False},
        "tracking": {"record_curves_seconds_median": 0.03, "record_summary_seconds": 0.02,
                     "epoch_seconds": 1.0, "batches_per_epoch": 76, "epochs": 12,
                     "share_of_training": 0.03, "share_with_run_start_and_end": 0.1,
                     "run_start_seconds": 0.02, "run_end_seconds": 1.0},
    }
    text = benchmark.markdown(result)
    header = next(line for line in text.splitlines() if line.startswith("| variant | batch"))
    assert header.split("|")[1:-1] == [f" {c} " for c in benchmark.TABLE_COLUMNS]
    rows = [line for line in text.splitlines() if line.startswith("| rnn | 32 |")]
    assert len(rows) == 2 and all(len(r.split("|")) == len(header.split("|")) for r in rows)
    assert "| 150 |" in text and "No-op `dvc repro`: 0.50 s" in text and "Tracking:" in text


# --- the command ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_run_writes_the_table(tmp_path):
    """`--quick` end to end on two variants, a no-op `dvc repro` in a clone included: the table
    file and its JSON are written with every column and every extra (no speed is checked)."""
    benchmark.main(["--quick", "--variants", "rnn", "lstm", "--threads", "1",
                    "--out", str(tmp_path)])
    (md,) = tmp_path.glob("*.md")
    (js,) = tmp_path.glob("*.json")
    text = md.read_text()
    assert "| " + " | ".join(benchmark.TABLE_COLUMNS) + " |" in text
    for variant in ("rnn", "lstm"):
        assert sum(line.startswith(f"| {variant} | 32 |") for line in text.splitlines()) == 2
    result = json.loads(js.read_text())
    assert [(p["variant"], p["batch"]) for p in result["training"]] == [("rnn", 32), ("lstm", 32)]
    for p in result["training"]:
        assert p["ratio"] > 0 and p["bound"] > 0 and p["flops_per_token"] > 0
        for side in ("book", "ours"):
            assert p[side]["min"] <= p[side]["median"] <= p[side]["max"]
    assert set(result["inference"]) == {"rnn", "lstm"}
    assert result["dvc"]["noop_repro_seconds"] > 0 and not result["dvc"]["noop_ran_a_stage"]
    assert 0 < result["tracking"]["share_of_training"]
