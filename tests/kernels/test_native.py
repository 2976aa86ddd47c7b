"""rnnlab/kernels/native.py: the compiled recurrences compute fused.py's functions and nn.GRU's / nn.RNN's /
nn.LSTM's, outputs, last state and every gradient; a machine that cannot build them gets a reason,
never an exception."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnnlab.fileio import CACHE_ENV
from rnnlab.kernels import cpu, fused, native

HAS_CXX = shutil.which("c++") is not None
TIGHT = {"rtol": 0, "atol": 1e-10}  # float64, as tests/models/test_models.py
LOOSE = {"rtol": 1e-4, "atol": 1e-5}  # float32, as tests/models/test_models.py
# (steps, batch, hidden, input): batch 1, one step, hidden not a multiple of the vector width, and
# the C++'s other code paths: on 2 threads a team of 2 (hidden >= 64, batch <= 64; slices of 32
# and 38 units), and past the team (batch 260 > 64: MKL threads the products, batch >= 256: the
# weight's gradient step by step, batch * hidden >= 32768: the gate passes split by rows)
SHAPES = [(5, 3, 13, 4), (1, 1, 8, 3), (6, 1, 5, 2), (1, 4, 7, 3), (4, 5, 70, 3), (3, 64, 64, 2),
          (3, 260, 130, 3)]


@pytest.fixture(scope="session")
def ops():
    """The compiled ops, built once per test session into the session's cache (conftest.py's
    RNNLAB_CACHE_DIR), or already loaded by an earlier test; skipped only where there is no C++
    compiler."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler (c++) on PATH")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(native.DISABLE_ENV, raising=False)
        native.load.cache_clear()
        assert native.load(), native.why_not()
    return native


def grads_of(fn, inputs, dtype, params=(), seed=1):
    """fn(*inputs) -> (outputs, last): those, and the gradients of a loss that weighs every output
    and the last state at random, for every input (copies) and every tensor of `params`."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, last = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=gen, dtype=dtype)
    w_last = torch.randn(last.shape, generator=gen, dtype=dtype)
    loss = (w_out * out).sum() + (w_last * last).sum()
    return [out.detach(), last.detach(), *torch.autograd.grad(loss, [*inputs, *params])]


def assert_all_close(got, expected, tol):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"item {i}: {m}")


def three_paths(cell, steps, batch, hidden, input_size, dtype):
    """Outputs, last state and the gradients of (x, h0, w_ih, w_hh, b_ih, b_hh) by the native
    recurrence, fused.py's, and nn.GRU / nn.RNN itself, from the same weights and input."""
    module = nn.GRU if cell == "gru" else nn.RNN
    torch.manual_seed(0)
    layer = module(input_size, hidden).to(dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(steps, batch, input_size, generator=gen, dtype=dtype)
    h0 = torch.randn(batch, hidden, generator=gen, dtype=dtype)
    params = [layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0]
    w_ih, w_hh, b_ih, b_hh = params

    def by(recurrence):
        if cell == "gru":  # gi = x W_ih^T + b_ih, as fused.py's gru layer
            return lambda x, h0: recurrence.apply(F.linear(x, w_ih, b_ih), h0, w_hh, b_hh)
        return lambda x, h0: recurrence.apply(F.linear(x, w_ih, b_ih + b_hh), h0, w_hh)

    def reference(x, h0):
        out, h = layer(x, h0[None])
        return out, h[0]

    native_fn = native.NativeGRU if cell == "gru" else native.NativeTanh
    fused_fn = fused.GRURecurrence if cell == "gru" else fused.TanhRecurrence
    return [grads_of(fn, [x, h0], dtype, params)
            for fn in (by(native_fn), by(fused_fn), reference)]


@pytest.fixture(params=[2, 1], ids=["2-threads", "1-thread"])
def threads(request):
    """torch's intra-op threads for the test: 2 (a team where the shape allows), or 1 (none)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_native_equals_fused_and_nn_float64(ops, cell, shape, threads):
    got, by_fused, by_nn = three_paths(cell, *shape, torch.float64)
    assert_all_close(got, by_fused, TIGHT)
    assert_all_close(got, by_nn, TIGHT)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_native_equals_fused_and_nn_float32(ops, cell, shape, threads, monkeypatch):
    monkeypatch.setattr(fused, "ONEDNN", False)  # fused.py's products through torch's matmul
    got, by_fused, by_nn = three_paths(cell, *shape, torch.float32)
    steps, batch = shape[:2]
    # a weight's gradient sums steps * batch products: float32's rounding grows with their number
    tol = LOOSE if steps * batch <= 100 else {**LOOSE, "atol": 1e-4}
    assert_all_close(got, by_fused, tol)
    assert_all_close(got, by_nn, tol)


# --- the LSTM: nn.LSTM's recurrence (no Python twin; nn.LSTM itself is the reference) ----------


def lstm_two_ways(steps, batch, hidden, input_size, dtype, loss_of=("out", "h", "c"), scale=1.0):
    """Outputs, last h and c, and the gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh) by
    NativeLSTM (as fused.lstm_layer calls it) and by nn.LSTM, from the same weights and input;
    the loss weighs `loss_of` at random. `scale` multiplies the input (saturated gates)."""
    torch.manual_seed(0)
    layer = nn.LSTM(input_size, hidden).to(dtype)
    gen = torch.Generator().manual_seed(0)
    x = scale * torch.randn(steps, batch, input_size, generator=gen, dtype=dtype)
    h0, c0 = (torch.randn(batch, hidden, generator=gen, dtype=dtype) for _ in range(2))
    weights = {name: torch.randn(shape, generator=gen, dtype=dtype)
               for name, shape in (("out", (steps, batch, hidden)), ("h", (batch, hidden)),
                                   ("c", (batch, hidden)))}
    params = list(layer.parameters())  # w_ih, w_hh, b_ih, b_hh
    w_ih, w_hh, b_ih, b_hh = params

    def by_native(x, h0, c0):
        return native.NativeLSTM.apply(F.linear(x, w_ih, b_ih + b_hh), h0, c0, w_hh)

    def by_nn(x, h0, c0):
        out, (h, c) = layer(x, (h0[None], c0[None]))
        return out, h[0], c[0]

    results = []
    for fn in (by_native, by_nn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, h0, c0)]
        out, h, c = fn(*leaves)
        got = {"out": out, "h": h, "c": c}
        loss = sum((weights[name] * got[name]).sum() for name in loss_of)
        results.append([out.detach(), h.detach(), c.detach(),
                        *torch.autograd.grad(loss, [*leaves, *params])])
    return results


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_lstm_equals_nn_lstm_float64(ops, shape, threads):
    assert_all_close(*lstm_two_ways(*shape, torch.float64), TIGHT)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_lstm_equals_nn_lstm_float32(ops, shape, threads):
    steps, batch = shape[:2]
    tol = LOOSE if steps * batch <= 100 else {**LOOSE, "atol": 1e-4}  # as the float32 test above
    assert_all_close(*lstm_two_ways(*shape, torch.float32), tol)


@pytest.mark.parametrize("use", ["out", "h", "c"])
def test_native_lstm_with_one_output_used(ops, use):
    """A loss of one of outputs, last h, last c: the others' gradients come in as zeros."""
    assert_all_close(*lstm_two_ways(4, 3, 6, 2, torch.float64, loss_of=(use,)), TIGHT)


def test_native_lstm_saturated_gates_float32(ops):
    """Pre-activations far past exp's float32 range: finite, and nn.LSTM's values."""
    got, expected = lstm_two_ways(4, 3, 9, 3, torch.float32, scale=300.0)
    assert all(t.isfinite().all() for t in got)
    assert_all_close(got, expected, {"rtol": 1e-4, "atol": 1e-3})


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_saturated_gates_stay_finite_as_in_nn_gru_and_nn_rnn(ops, cell):
    """Pre-activations far past exp's float32 range (|a| > 88): the gates saturate to 0 / 1 and
    tanh to -1 / 1 without inf or NaN, as in nn.GRU / nn.RNN."""
    steps, batch, hidden = 4, 3, 9
    gen = torch.Generator().manual_seed(3)
    gates = 3 if cell == "gru" else 1
    g = 300 * torch.randn(steps, batch, gates * hidden, generator=gen)
    h0 = torch.randn(batch, hidden, generator=gen)
    w = torch.randn(gates * hidden, hidden, generator=gen)
    if cell == "gru":
        b = torch.randn(gates * hidden, generator=gen)
        got = grads_of(native.NativeGRU.apply, [g, h0, w, b], torch.float32)
        expected = grads_of(fused.GRURecurrence.apply, [g, h0, w, b], torch.float32)
    else:
        got = grads_of(native.NativeTanh.apply, [g, h0, w], torch.float32)
        expected = grads_of(fused.TanhRecurrence.apply, [g, h0, w], torch.float32)
    assert all(t.isfinite().all() for t in got)
    assert_all_close(got, expected, LOOSE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("cell", ["gru", "rnn", "lstm"])
def test_nan_stays_nan(ops, cell, dtype):
    """A NaN pre-activation gives NaN in that unit's output, as nn.GRU / nn.RNN: a diverged model
    must show a NaN loss (the train stage stops on it), never a finite one."""
    steps, batch, hidden = 3, 2, 9
    gen = torch.Generator().manual_seed(4)
    gates = {"gru": 3, "lstm": 4, "rnn": 1}[cell]
    g = torch.randn(steps, batch, gates * hidden, generator=gen, dtype=dtype)
    g[0, 1, 0] = float("nan")   # row 1's first unit (the GRU's reset gate, the LSTM's input gate)
    h0 = torch.randn(batch, hidden, generator=gen, dtype=dtype)
    w = torch.randn(gates * hidden, hidden, generator=gen, dtype=dtype)
    if cell == "gru":
        out, last = ops.NativeGRU.apply(g, h0, w, torch.zeros(gates * hidden, dtype=dtype))
    elif cell == "lstm":
        out, last, _ = ops.NativeLSTM.apply(g, h0, torch.zeros_like(h0), w)
    else:
        out, last = ops.NativeTanh.apply(g, h0, w)
    assert out[0, 1].isnan().any() and last[1].isnan().any()
    assert out[:, 0].isfinite().all()   # the other row is untouched


@pytest.mark.parametrize("use", ["outputs", "last"])
@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_an_unused_output_or_last_state_gets_zero_gradients(ops, cell, use):
    """A loss of the outputs only, or of the last state only: the other's gradient is zeros."""
    steps, batch, hidden = 4, 2, 6
    gen = torch.Generator().manual_seed(5)
    gates = 3 if cell == "gru" else 1
    inputs = [torch.randn(steps, batch, gates * hidden, generator=gen, dtype=torch.float64),
              torch.randn(batch, hidden, generator=gen, dtype=torch.float64),
              torch.randn(gates * hidden, hidden, generator=gen, dtype=torch.float64)]
    if cell == "gru":
        inputs.append(torch.randn(gates * hidden, generator=gen, dtype=torch.float64))
    results = []
    for fn in ((native.NativeGRU, fused.GRURecurrence) if cell == "gru"
               else (native.NativeTanh, fused.TanhRecurrence)):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out, last = fn.apply(*leaves)
        loss = out.square().sum() if use == "outputs" else last.square().sum()
        results.append(torch.autograd.grad(loss, leaves))
    assert_all_close(*results, TIGHT)


def test_native_gru_takes_views_as_the_scratch_cells_pass_them(ops):
    """Views in, as the scratch cells pass them (a transposed weight, a slice of the terms)."""
    steps, batch, hidden = 3, 2, 5
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(steps, batch, 4 * hidden, generator=gen, dtype=torch.float64)
    gi = wide[..., hidden:]  # (steps, batch, 3*hidden), not contiguous
    h0 = torch.randn(hidden, batch, generator=gen, dtype=torch.float64).t()
    w = torch.randn(hidden, 3 * hidden, generator=gen, dtype=torch.float64).t()
    b = torch.randn(3 * hidden, generator=gen, dtype=torch.float64)
    got = grads_of(native.NativeGRU.apply, [gi, h0, w, b], torch.float64)
    expected = grads_of(fused.GRURecurrence.apply, [gi, h0, w, b], torch.float64)
    assert_all_close(got, expected, TIGHT)


def test_wrong_shapes_raise(ops):
    gi, h0 = torch.zeros(2, 3, 12), torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        native.NativeGRU.apply(gi, h0, torch.zeros(12, 5), torch.zeros(12))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        native.NativeTanh.apply(torch.zeros(2, 3, 4, dtype=torch.int64), h0.long(),
                                torch.zeros(4, 4, dtype=torch.int64))


def test_library_is_cached_outside_the_repo(ops, tmp_path, monkeypatch):
    """The build lands in $RNNLAB_CACHE_DIR/native/, named recurrence-<target>-<build>.so: the
    compiler's -march=native target, then a key of that, source, torch, compiler and flags."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = native.library_path()
    assert path.parent == tmp_path / "native" and path.suffix == ".so"
    assert path.name == f"recurrence-{native.target_digest()}-{native.build_key()}.so"
    assert re.fullmatch(r"recurrence-[0-9a-f]{8}-[0-9a-f]{16}\.so", path.name)
    monkeypatch.setenv("CXX", "c++ -DRNNLAB_OTHER_FLAGS")
    assert native.library_path() != path  # the compiler's command is part of the key


def test_no_compiler_gives_a_reason_not_an_exception(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert native.build(verbose=False) is None
    assert "/nonexistent/c++" in native.why_not()
    assert "\n" not in native.why_not()
    assert not list((tmp_path / "native").glob("*.so"))  # no half-written library left
    assert native.main(["build"]) == 0  # `make setup` goes on without a compiler
    assert "not built" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler (c++) on PATH")
def test_compile_error_gives_the_compiler_s_message(tmp_path, monkeypatch):
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++;\n")
    monkeypatch.setattr(native, "SOURCE", source)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("CXX", raising=False)
    assert native.build(verbose=False) is None
    assert "failed" in native.why_not() and "error" in native.why_not()
    assert "\n" not in native.why_not()
    assert "error" in native.build_log()
    assert not list((tmp_path / "cache" / "native").glob("*.so"))


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native.load.cache_clear()
    try:
        assert native.load() is False
        assert native.why_not() == "RNNLAB_NATIVE=0"
    finally:
        native.load.cache_clear()  # the next load() decides again, without the variable



# --- the build's key, a library that does not load, pruning ------------------------------------

MACROS_A = "#define __AVX2__ 1\n#define __VERSION__ \"12.2.0\""
MACROS_B = "#define __AVX512F__ 1\n#define __AVX2__ 1\n#define __VERSION__ \"12.2.0\""
DAY = 86400


def test_without_proc_cpuinfo_the_target_isa_still_keys_the_build(tmp_path, monkeypatch):
    """An AVX-512 build must never load on an AVX2 machine, /proc/cpuinfo or not: the key is the
    compiler's -march=native macro set, which holds the target ISA and the compiler's version."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cpu, "cpuinfo", dict)  # no /proc/cpuinfo: {}
    paths = []
    for macros in (MACROS_A, MACROS_B, MACROS_A.replace("12.2.0", "13.1.0")):
        monkeypatch.setattr(cpu, "native_macros", lambda m=macros: m)
        paths.append(native.library_path())
    targets = {p.name.split("-")[1] for p in paths}
    builds = {p.name.split("-")[2] for p in paths}
    assert len(targets) == 3 and len(builds) == 3  # another ISA, another compiler version


def fake_compiler(monkeypatch, library: Path) -> list[Path]:
    """native's compiler replaced by a copy of `library`; -> the outputs it was asked for."""
    outputs: list[Path] = []

    def command(source, out):
        outputs.append(Path(out))
        return ["cp", str(library), str(out)]

    monkeypatch.setattr(native, "_command", command)
    return outputs


def aged(path: Path, days: float, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    t = time.time() - days * DAY
    os.utime(path, (t, t))
    return path


def test_a_machine_s_build_leaves_other_machines_builds_alone(tmp_path, monkeypatch):
    """Node B shares node A's cache folder: B compiles a build of its own (the compile faked),
    and A's current build stays."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cpu, "native_macros", lambda: MACROS_A)
    a_build = aged(native.library_path(), 2, b"A's library")
    monkeypatch.setattr(cpu, "native_macros", lambda: MACROS_B)
    outputs = fake_compiler(monkeypatch, aged(tmp_path / "b.so", 0, b"B's library"))
    b_build = native.build(verbose=False)
    assert b_build == native.library_path() != a_build
    assert len(outputs) == 1 and b_build.read_bytes() == b"B's library"
    assert a_build.read_bytes() == b"A's library"


def test_pruning_after_a_build(tmp_path, monkeypatch):
    """This target's builds for other inputs (with their locks) go once unused for a day; other
    targets' builds, killed builds' temporary files and locks once unused for 30 days; another
    node's current build, which its loads keep touching, stays; files not ours stay."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cpu, "native_macros", lambda: MACROS_A)
    current = native.library_path()
    folder, mine = current.parent, f"recurrence-{native.target_digest()}-"
    gone = [aged(folder / f"{mine}{'0' * 16}.so", 2),  # this machine, an old source or torch
            aged(folder / f"{mine}{'0' * 16}.so.lock", 2),
            aged(folder / "recurrence-0badc0de-1111111111111111.so", 31),  # a node gone a month
            aged(folder / "recurrence-0badc0de-1111111111111111.so.lock", 31),
            aged(folder / f"{current.stem}.k1ll3d.tmp.so", 31),  # a build killed a month ago
            aged(folder / "recurrence-0137d4207942b5e2.so", 40)]  # the older naming, unused
    kept = [aged(folder / "recurrence-5eedf00d-2222222222222222.so", 3),  # another node's, used
            aged(folder / "recurrence-5eedf00d-2222222222222222.so.lock", 90),  # its lock
            aged(folder / f"{mine}{'3' * 16}.a1b2c3.tmp.so", 0),  # a build under way
            aged(folder / f"{mine}{'4' * 16}.so", 0.5),  # another venv's here, used today
            aged(folder / "notes.txt", 90)]  # not ours
    fake_compiler(monkeypatch, aged(tmp_path / "good.so", 0))
    assert native.build(verbose=False) == current
    assert current.exists() and (folder / f"{current.name}.lock").exists()
    assert [p.name for p in gone if p.exists()] == []
    assert [p.name for p in kept if not p.exists()] == []


def test_a_library_replaced_meanwhile_is_not_compiled_again(tmp_path, monkeypatch):
    """Two processes failed to load the same file: the first compiles it again, the second finds
    the new file (another inode) and takes it."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = aged(native.library_path(), 0, b"garbage")
    bad = path.stat()
    outputs = fake_compiler(monkeypatch, aged(tmp_path / "good.so", 0, b"good"))
    aged(tmp_path / "other.so", 0, b"rebuilt by another process").replace(path)
    assert native.build(verbose=False, bad=bad) == path
    assert outputs == [] and path.read_bytes() == b"rebuilt by another process"
    assert native.build(verbose=False, bad=path.stat()) == path  # the file that failed itself
    assert len(outputs) == 1 and path.read_bytes() == b"good"


LOAD_SCRIPT = """
import json, sys
from pathlib import Path
from rnnlab.kernels import native

case, good, garbage = sys.argv[1:]
compiles = []
def command(source, out):
    compiles.append(str(out))
    return ["cp", good if case != "rebuilt-garbage" else garbage, str(out)]
native._command = command
path = native.library_path()
path.parent.mkdir(parents=True)
path.write_bytes(Path(good if case == "good" else garbage).read_bytes())
native.os.utime(path, (1e9, 1e9))
ok = native.load()
print(json.dumps({"ok": ok, "why": native.why_not(), "compiles": len(compiles), "path": str(path),
                  "mtime": path.stat().st_mtime}))
"""


@pytest.mark.slow  # a fresh Python each, importing torch and loading the compiled library
@pytest.mark.parametrize("case", ["good", "garbage", "rebuilt-garbage"])
def test_a_library_that_does_not_load_is_compiled_again_once(ops, tmp_path, case):
    """In a fresh process and cache: a good library loads as it is (and is marked used); one
    that does not load (a truncated file) is compiled again once (the compiler faked: a copy of
    this session's good library) and loads; if that one fails too, load() is False and
    why_not() names the file and the reason, in one line."""
    good = native._loaded
    assert good is not None and good.exists()
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"\x7fELF not a library")
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache")}
    env.pop(native.DISABLE_ENV, None)
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, case, str(good), str(garbage)],
                          capture_output=True, text=True, env=env, timeout=300, check=True)
    got = json.loads(done.stdout.splitlines()[-1])
    if case == "good":
        assert got["ok"] and got["compiles"] == 0 and got["why"] == ""
        assert got["mtime"] > time.time() - DAY  # touched: in use
    elif case == "garbage":
        assert got["ok"] and got["compiles"] == 1 and got["why"] == ""
        assert "compiling it again" in done.stderr
    else:
        assert not got["ok"] and got["compiles"] == 1
        assert got["path"] in got["why"] and "failed" in got["why"]
        assert "after compiling it again" in got["why"] and "\n" not in got["why"]
