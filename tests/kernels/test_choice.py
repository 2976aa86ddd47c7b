"""rnnlab/kernels/choice.py: choices by measurement, the reference unless beaten, cached per machine."""

from __future__ import annotations

import datetime
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


# --- a cache folder shared by machines (a cluster's one home folder) ---------------------------

OTHER_CPU = "AMD EPYC (family 23 model 49 stepping 0) | isa 0badc0de"  # same model name, Zen 2
OTHER_MACROS = "#define __AVX2__ 1\n#define __VERSION__ \"12.2.0\"\n#define __znver2__ 1"


class Spy:
    """choice.measure that counts its calls and gives fixed seconds."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.calls = seconds, 0

    def __call__(self, candidates):
        self.calls += 1
        return dict(self.seconds)


def as_other_machine(monkeypatch):
    """Machine B: another CPU of the same model name, whose compiler targets another ISA."""
    monkeypatch.setattr(choice.cpu, "identity", lambda: OTHER_CPU)
    monkeypatch.setattr(choice.cpu, "native_macros", lambda: OTHER_MACROS)


def stored(cache) -> dict:
    return json.loads((cache / "kernels.json").read_text())["entries"]


def test_machines_sharing_a_cache_folder_keep_their_own_choices(own_cache, monkeypatch):
    from rnnlab.kernels import native

    candidates = {"reference": None, "fused": None}
    monkeypatch.setattr(choice, "measure", Spy({"reference": 2.0, "fused": 1.0}))
    assert choice.choose("layer", "k", candidates) == "fused"  # machine A
    a_build = native.library_path()

    with monkeypatch.context() as b:
        as_other_machine(b)
        choice.forget()  # as a process on node B
        spy = Spy({"reference": 1.0, "fused": 2.0})
        b.setattr(choice, "measure", spy)
        assert choice.choose("layer", "k", candidates) == "reference"  # not A's "fused"
        assert spy.calls == 1
        assert choice.machine().startswith(OTHER_CPU)
        assert [e["choice"] for e in choice.cached_here()] == ["reference"]
        b_build = native.library_path()
    assert b_build != a_build and b_build.parent == a_build.parent  # B builds its own library
    assert {e["cpu"] for e in stored(own_cache).values()} == {OTHER_CPU, choice.cpu.identity()}

    choice.forget()  # node A again: its choice is there, unmeasured
    monkeypatch.setattr(choice, "measure", lambda c: pytest.fail("A measured again"))
    assert choice.choose("layer", "k", candidates) == "fused"
    assert [e["choice"] for e in choice.cached_here()] == ["fused"]


@pytest.mark.parametrize("change", ["code", "library"])
@pytest.mark.parametrize("days", [2, 0.5])
def test_a_choice_of_other_kernel_code_or_library_is_measured_again_and_dropped(
        own_cache, monkeypatch, change, days):
    """The key holds the kernel code's digest and the compiled library's build key: after a
    change the choice is measured again, and the old entry, which nothing here can read any
    more, leaves the cache once measured over a day ago (a younger one may be another checkout's
    on this machine, which still reads it). Another CPU's entries stay."""
    from rnnlab.kernels import native

    candidates = {"reference": None, "fused": None}
    with monkeypatch.context() as b:
        as_other_machine(b)
        b.setattr(choice, "measure", Spy({"reference": 1.0, "fused": 2.0}))
        choice.choose("layer", "k", candidates)
    choice.forget()
    monkeypatch.setattr(choice, "measure", Spy({"reference": 2.0, "fused": 1.0}))
    choice.choose("layer", "k", candidates)
    old_key = choice.here()
    choice.forget()
    entries = stored(own_cache)
    for key in entries:
        if key.startswith(old_key):
            when = datetime.datetime.now() - datetime.timedelta(days=days)
            entries[key]["when"] = when.isoformat(timespec="seconds")
    (own_cache / "kernels.json").write_text(json.dumps({"version": choice.CACHE_VERSION,
                                                        "entries": entries}))
    if change == "code":
        monkeypatch.setattr(choice, "code_digest", lambda: "0" * 12)
    else:
        monkeypatch.setattr(native, "build_key", lambda: "f" * 16)
        assert choice.library_digest() == "f" * 16
    assert choice.here() != old_key
    spy = Spy({"reference": 1.0, "fused": 2.0})
    monkeypatch.setattr(choice, "measure", spy)
    assert choice.choose("layer", "k", candidates) == "reference"
    assert spy.calls == 1
    keys = list(stored(own_cache))
    assert any(k.startswith(old_key) for k in keys) == (days < 1)  # stale: dropped on store
    assert sum(k.startswith(choice.here()) for k in keys) == 1
    assert sum(k.startswith(OTHER_CPU) for k in keys) == 1  # node B's own, untouched


def test_the_library_part_is_none_when_the_compiled_path_is_off(monkeypatch):
    monkeypatch.setenv("RNNLAB_NATIVE", "0")
    assert choice.library_digest() == "none"
    assert choice.here().endswith(" | native none")
    monkeypatch.delenv("RNNLAB_NATIVE")
    assert choice.library_digest() != "none"


def test_the_code_digest_follows_every_kernel_file(tmp_path, monkeypatch):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "csrc" / "r.cpp").write_text("int f();\n")
    (tmp_path / "notes.txt").write_text("not code\n")
    monkeypatch.setattr(choice, "KERNEL_CODE", tmp_path)
    digests = []
    for path, text in [(None, None), (tmp_path / "notes.txt", "still not code\n"),
                       (tmp_path / "csrc" / "r.cpp", "int g();\n"), (tmp_path / "a.py", "x = 2\n")]:
        if path is not None:
            path.write_text(text)
        choice.code_digest.cache_clear()
        digests.append(choice.code_digest())
    choice.code_digest.cache_clear()
    assert digests[0] == digests[1]  # a file that is not code changes nothing
    assert len(set(digests[1:])) == 3  # the .cpp and the .py each do


def test_chosen_names_every_decision_forced_or_measured(monkeypatch):
    monkeypatch.setattr(choice, "measure", Spy({"reference": 2.0, "fused": 1.0}))
    choice.choose("layer", "gru k", {"reference": None, "fused": None})
    monkeypatch.setenv("RNNLAB_PRODUCT", "onednn")
    choice.choose("product", "32x256", {"mkl": None, "onednn": None})
    assert choice.chosen() == {"layer gru k": "fused", "product 32x256": "onednn"}
    assert choice.summary() == "layer=fused"  # as before: the measured ones
    choice.forget()
    assert choice.chosen() == {}
