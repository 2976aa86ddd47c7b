"""rnnlab.softmax.linear_cross_entropy: the same loss and gradients as
F.cross_entropy(F.linear(...), reduction="sum"), with and without grad, with and without bias."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnnlab.kernels import fused
from rnnlab.kernels.softmax import linear_cross_entropy

ROWS, IN, VOCAB = 13, 7, 50


def inputs(dtype, bias=True, seed=0, scale=1.0):
    """x (rows, in) times scale (a number or (rows, 1)), weight (vocab, in), bias (vocab,) or
    None, all requiring grad; targets (rows,) with both ends of the vocabulary and a repeat."""
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(ROWS, IN, generator=gen, dtype=dtype)).requires_grad_()
    weight = torch.randn(VOCAB, IN, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(VOCAB, generator=gen, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(VOCAB, (ROWS,), generator=gen)
    targets[:3] = torch.tensor([0, VOCAB - 1, VOCAB - 1])
    return x, weight, b, targets


def loss_and_grads(loss_fn, x, weight, bias, targets, d_loss=0.37):
    """The loss and the gradients of d_loss * loss for every input that requires grad."""
    params = [t for t in (x, weight, bias) if t is not None]
    loss = loss_fn(x, weight, bias, targets)
    return loss.detach(), torch.autograd.grad(d_loss * loss, params)


def reference(x, weight, bias, targets):
    return F.cross_entropy(F.linear(x, weight, bias), targets, reduction="sum")


def assert_matches(dtype, bias, scale=1.0, **tol):
    args = inputs(dtype, bias, scale=scale)
    loss, grads = loss_and_grads(linear_cross_entropy, *args)
    ref_loss, ref_grads = loss_and_grads(reference, *args)
    assert loss.shape == () and loss.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, **tol)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, **tol)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_float64_matches_reference_tightly(bias):
    assert_matches(torch.float64, bias, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "torch-matmul"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_float32_matches_reference(bias, onednn, monkeypatch):
    if onednn and not fused.ONEDNN:
        pytest.skip("this PyTorch has no oneDNN linear")
    monkeypatch.setattr(fused, "ONEDNN", onednn)
    assert_matches(torch.float32, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_near_float64(dtype):
    """16-bit floats round too coarsely to match the reference's own rounding: both are held to
    the float64 answer, within a few of the dtype's epsilons of the largest value."""
    args = inputs(dtype)
    loss, grads = loss_and_grads(linear_cross_entropy, *args)
    exact_args = [t.detach().double().requires_grad_() for t in args[:3]]
    exact_loss, exact_grads = loss_and_grads(reference, *exact_args, args[3])
    eps = torch.finfo(dtype).eps
    for ours, exact in zip([loss, *grads], [exact_loss, *exact_grads], strict=True):
        assert ours.dtype == dtype
        assert (ours.double() - exact).abs().max() <= 4 * eps * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_whose_target_probability_underflows(dtype):
    """Every other row's logits thousands apart: there softmax(target) is 0 or subnormal, and the
    loss is still the reference's finite number."""
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {}
    scale = torch.tensor([1.0, 300.0], dtype=dtype).repeat(ROWS)[:ROWS, None]  # (rows, 1)
    assert_matches(dtype, bias=True, scale=scale, **tol)


def test_uniform_model_known_answer():
    """Zero weights and bias: every row costs log(vocab)."""
    x, weight, bias, targets = inputs(torch.float64)
    with torch.no_grad():
        weight.zero_()
        bias.zero_()
    loss = linear_cross_entropy(x, weight, bias, targets)
    assert loss.item() == pytest.approx(ROWS * math.log(VOCAB), rel=1e-12)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_without_grad_just_the_loss(bias):
    x, weight, b, targets = inputs(torch.float64, bias)
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, b, targets)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference(x, weight, b, targets).detach(), rtol=1e-10,
                               atol=1e-10)
    # nothing requires grad: the same, outside no_grad
    plain = [t.detach() if t is not None else None for t in (x, weight, b)]
    loss = linear_cross_entropy(*plain, targets)
    assert loss.grad_fn is None and not loss.requires_grad


def test_only_the_weight_requires_grad():
    x, weight, bias, targets = inputs(torch.float64)
    x, bias = x.detach(), bias.detach()
    (grad,) = torch.autograd.grad(linear_cross_entropy(x, weight, bias, targets), weight)
    (ref,) = torch.autograd.grad(reference(x, weight, bias, targets), weight)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-10)


def test_second_backward_raises():
    x, weight, bias, targets = inputs(torch.float64)
    loss = linear_cross_entropy(x, weight, bias, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_mismatched_shapes_raise():
    x, weight, bias, targets = inputs(torch.float64)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(x, weight, bias, targets[:-1])
