"""rnnlab/kernels/choice.py: choices by measurement, the reference unless beaten, cached per machine."""

from __future__ import annotations

import json

import pytest
import torch

from rnnlab.errors import UserError
from rnnlab.kernels import choice, fused

pytestmark = pytest.mark.measured  # these tests are about the measuring


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RNNLAB_KERNEL", raising=False)
    monkeypatch.delenv("RNNLAB_PRODUCT", raising=False)
    choice.forget()
    yield tmp_path / "cache"
    choice.forget()


class Clock:
    """A perf_counter that only candidates move: each call of a candidate costs its seconds, so
    the measurement is exact whatever else the machine does."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def costing(self, seconds: float):
        def candidate():
            self.now += seconds
        return candidate


def test_the_fastest_candidate_is_chosen_and_cached(own_cache, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(choice.time, "perf_counter", clock)
    picked = choice.choose("layer", "shape A", {"reference": clock.costing(0.004),
                                                "fused": clock.costing(0.001)})
    assert picked == "fused"
    entry, = json.loads((own_cache / "kernels.json").read_text())["entries"].values()
    assert entry["choice"] == "fused" and entry["key"] == "shape A"
    assert entry["seconds"] == pytest.approx({"reference": 0.004, "fused": 0.001})
    assert choice.report() == [
        f"layer shape A: fused (against reference: fused "
        f"{entry['seconds']['reference'] / entry['seconds']['fused']:.2f}x)"]
    assert choice.summary() == "layer=fused"


def test_the_reference_holds_unless_beaten_by_the_margin(monkeypatch):
    monkeypatch.setattr(choice, "measure", lambda c: {"reference": 1.0, "fused": 0.99, "native": 0.98})
    assert choice.choose("layer", "close", {"reference": None, "fused": None, "native": None}) == "reference"
    monkeypatch.setattr(choice, "measure", lambda c: {"reference": 1.0, "fused": 0.9, "native": 0.8})
    assert choice.choose("layer", "far", {"reference": None, "fused": None, "native": None}) == "native"


def test_a_decision_is_measured_once_then_read_from_the_cache(monkeypatch):
    measured = []
    monkeypatch.setattr(choice, "measure", lambda c: measured.append(1) or {"reference": 2.0, "fused": 1.0})
    candidates = {"reference": None, "fused": None}
    assert choice.choose("layer", "k", candidates) == "fused"
    choice.forget()  # as a later process: it reads the file
    assert choice.choose("layer", "k", candidates) == "fused"
    assert measured == [1]
    # another machine, torch or thread count: measured again
    monkeypatch.setattr(choice, "machine", lambda: "Other CPU | torch 0 | AVX2 | 1 threads")
    monkeypatch.setattr(choice, "measure", lambda c: measured.append(1) or {"reference": 1.0, "fused": 2.0})
    assert choice.choose("layer", "k", candidates) == "reference"
    assert measured == [1, 1]


def test_the_first_process_to_store_a_decision_wins(own_cache, monkeypatch):
    """Two queued trainings measure the same shape at once: both take the stored one."""
    monkeypatch.setattr(choice, "measure", lambda c: {"reference": 2.0, "fused": 1.0})
    choice.choose("layer", "k", {"reference": None, "fused": None})
    choice.forget()
    monkeypatch.setattr(choice, "_cached", lambda full: None)  # it measured before the other stored
    monkeypatch.setattr(choice, "measure", lambda c: {"reference": 1.0, "fused": 2.0})
    assert choice.choose("layer", "k", {"reference": None, "fused": None}) == "fused"


def test_forcing_a_path_skips_the_measurement(monkeypatch):
    monkeypatch.setattr(choice, "measure", lambda c: pytest.fail("measured"))
    monkeypatch.setenv("RNNLAB_KERNEL", "fused")
    assert choice.choose("layer", "k", {"reference": None, "fused": None}) == "fused"
    monkeypatch.setenv("RNNLAB_PRODUCT", "onednn")
    assert choice.choose("product", "k", {"mkl": None, "onednn": None}) == "onednn"


def test_a_forced_value_that_names_nothing_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("RNNLAB_KERNEL", "fast")
    with pytest.raises(UserError, match=r"RNNLAB_KERNEL = 'fast': allowed: measure, reference, fused, native$"):
        choice.choose("layer", "k", {"reference": None, "fused": None})
    monkeypatch.setenv("RNNLAB_PRODUCT", "blas")
    with pytest.raises(UserError, match=r"RNNLAB_PRODUCT = 'blas': allowed: measure, mkl, onednn$"):
        choice.choose("product", "k", {"mkl": None, "onednn": None})


def test_a_forced_path_a_stack_lacks_gives_its_reference_said_once(monkeypatch, capsys):
    """RNNLAB_KERNEL=fused holds for a sweep of variants: an lstm (no fused path) or a machine
    without the compiled loop runs the reference, and says so once."""
    monkeypatch.setattr(choice, "measure", lambda c: pytest.fail("measured"))
    monkeypatch.setenv("RNNLAB_KERNEL", "fused")
    for _ in range(2):
        assert choice.choose("layer", "lstm k", {"reference": None, "native": None}) == "reference"
    assert choice.choose("layer", "lstm j", {"reference": None}) == "reference"
    err = capsys.readouterr().err
    assert err.count("kernels: layer lstm k: no fused here (RNNLAB_KERNEL); reference runs") == 1
    assert "layer lstm j: no fused here" in err


def test_an_unwritable_cache_costs_a_warning_not_the_run(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RNNLAB_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot exist
    monkeypatch.setattr(choice, "measure", lambda c: {"reference": 2.0, "fused": 1.0})
    assert choice.choose("layer", "k", {"reference": None, "fused": None}) == "fused"
    assert "kernel choices not cached" in capsys.readouterr().err


def test_measure_leaves_torch_s_random_state_as_it_was():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    choice.measure({"a": lambda: torch.rand(100), "b": lambda: torch.randn(10)})
    assert torch.equal(torch.rand(3), expected)


def test_a_product_runs_through_the_library_measured_faster(monkeypatch):
    """fused.Product and fused._linear: the library choice.choose names, with oneDNN's weight
    laid out for a sequence; the result is x @ w^T either way."""
    if not fused.ONEDNN:
        pytest.skip("this PyTorch has no oneDNN linear")
    w, x = torch.randn(24, 16), torch.randn(8, 16)
    for faster in ("mkl", "onednn"):
        choice.forget()
        monkeypatch.setattr(choice, "measure",
                            lambda c, f=faster: {name: 0.5 if name == f else 1.0 for name in c})
        monkeypatch.setattr(choice, "_store", lambda full, entry: entry)
        monkeypatch.setattr(choice, "_cached", lambda full: None)
        product = fused.Product(w, rows=8, uses=35)
        assert product.library is fused.LIBRARIES[faster]
        torch.testing.assert_close(product(x), x @ w.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused._linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
        assert {e["choice"] for e in choice._decided.values()} == {faster}


def test_float64_products_never_measure(monkeypatch):
    monkeypatch.setattr(choice, "measure", lambda c: pytest.fail("measured"))
    w = torch.randn(5, 4, dtype=torch.float64)
    assert fused.Product(w, rows=3, uses=35).library is fused._mkl
    fused._linear(torch.randn(3, 4, dtype=torch.float64), w)


def test_rnnlab_kernels_lists_and_forgets_this_machine_s_choices(monkeypatch, capsys):
    from rnnlab.cli.main import main

    monkeypatch.setattr(choice, "measure", lambda c: {"reference": 2.0, "fused": 1.0})
    choice.choose("layer", "gru torch: k", {"reference": None, "fused": None})
    threads = str(torch.get_num_threads())
    main(["kernels", "--threads", threads])
    out = capsys.readouterr().out
    assert "1 choice(s)" in out and "layer gru torch: k: fused (against reference: fused 2.00x)" in out
    main(["kernels", "--threads", threads, "--forget"])
    assert "forgotten: 1" in capsys.readouterr().out
    main(["kernels", "--threads", threads])
    assert "0 choice(s)" in capsys.readouterr().out
