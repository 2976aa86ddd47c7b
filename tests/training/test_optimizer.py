"""PlainOptimizer against torch.optim: bit-equal parameters and state over many steps, for every
optimizer and weight decay that params allow, and state_dicts that each loads from the other."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from rnnlab.config import Train
from rnnlab.training.loop import PlainOptimizer, make_optimizer
from tests.stagerun import ROOT, stage_env

TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (3,))]


def steps(opt, ps, n: int, seed: int, lrs=None) -> None:
    """n steps of random gradients (the last parameter gets none every third step)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        opt.zero_grad(set_to_none=True)
        for j, p in enumerate(ps):
            if j < len(ps) - 1 or i % 3:
                p.grad = torch.randn(p.shape, generator=g) * 10 ** float(i % 5 - 2)
        for group in opt.param_groups:  # as the epoch loop sets its schedule
            group["lr"] = 0.01 * (1 + i % 4) if lrs is None else lrs
        opt.step()


def saved(opt) -> dict:
    """opt's state_dict written and read back, as resume.pt holds it."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


def assert_same(a, pa, b, pb) -> None:
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, s in sa["state"].items():
        assert s.keys() == sb["state"][i].keys()
        for k, x in s.items():
            y = sb["state"][i][k]
            assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y), (i, k)


@pytest.mark.parametrize("kind", sorted(TORCH))
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_bit_equal_to_torch_optim_over_many_steps(kind, weight_decay):
    ours, theirs = params(0), params(0)
    a = PlainOptimizer(kind, ours, lr=0.01, weight_decay=weight_decay)
    b = TORCH[kind](theirs, lr=0.01, weight_decay=weight_decay)
    steps(a, ours, 300, seed=1)
    steps(b, theirs, 300, seed=1)
    assert_same(a, ours, b, theirs)


@pytest.mark.parametrize("kind", sorted(TORCH))
def test_state_dicts_load_both_ways(kind):
    """Resumed halfway from the other's state_dict (saved and loaded as resume.pt is), each goes
    on as one run of either would."""
    ref_p, ours_p, theirs_p = params(0), params(0), params(0)
    ref = TORCH[kind](ref_p, lr=0.01, weight_decay=0.01)
    steps(ref, ref_p, 50, seed=2)
    ours = PlainOptimizer(kind, ours_p, lr=0.5, weight_decay=0.0)  # the saved group wins
    theirs = TORCH[kind](theirs_p, lr=0.5, weight_decay=0.0)
    for p, r in zip(ours_p, ref_p):
        p.data.copy_(r.data)
    ours.load_state_dict(saved(ref))
    steps(ours, ours_p, 50, seed=3)
    for q, p in zip(theirs_p, ours_p):
        q.data.copy_(p.data)
    theirs.load_state_dict(saved(ours))  # torch.optim reads ours
    steps(theirs, theirs_p, 50, seed=4)
    steps(ref, ref_p, 50, seed=3)
    steps(ref, ref_p, 50, seed=4)
    assert_same(theirs, theirs_p, ref, ref_p)


def test_make_optimizer_is_plain_on_the_cpu():
    model = torch.nn.Linear(3, 2)
    for kind in TORCH:
        cfg = Train.model_construct(optimizer=kind, lr=0.1, weight_decay=0.0)
        assert isinstance(make_optimizer(model, cfg), PlainOptimizer)


@pytest.mark.slow  # a fresh Python is the point: whether the import happens at all
def test_a_training_step_imports_no_dynamo():
    code = ("import sys, torch\n"
            "from rnnlab.training.loop import PlainOptimizer\n"
            "m = torch.nn.Linear(3, 2)\n"
            "for kind in ('sgd', 'adam'):\n"
            "    opt = PlainOptimizer(kind, m.parameters(), 0.1, 0.01)\n"
            "    opt.zero_grad(); m(torch.ones(3)).sum().backward(); opt.step()\n"
            "    opt.load_state_dict(opt.state_dict())\n"
            "torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=stage_env(),
                         capture_output=True, text=True, check=True).stdout
    assert out == "False\n"
