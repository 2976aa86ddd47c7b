"""The fused CPU path of the `rnn` and `gru` cells: the same function as nn.RNN / nn.GRU (and
the scratch cells), faster on the CPU.

One torch.autograd.Function per layer with a hand-written backward: the input projection of all
steps before the loop (a row lookup for one-hot input), one product per step forward and one
backward, the recurrent weight's gradient as one product over all steps (or step by step from a
batch of STEPWISE_GRAD_BATCH), float32 products through oneDNN with the weight packed once per
sequence. rnnlab/models.py decides when it applies (`fused_applies`); tests/test_models.py holds it
equal to nn.* and the scratch loop, forward and backward. docs/benchmark.md measures it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fused_applies(x: torch.Tensor) -> bool:
    """The fused path is for the CPU, outside autocast (where nn.* know what runs in bfloat16)."""
    return x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


# The fused path. PyTorch runs nn.RNN and nn.GRU on the CPU one small autograd op at a time: per
# step the input product (a one-hot row times W_ih), the recurrent product, the gates, and in the
# backward, per step again, a product for the state's gradient and one more for the recurrent
# weight's. Here the recurrence of a layer is one torch.autograd.Function with its backward by
# hand: the input projection is computed for all steps before the loop (a row lookup for token
# ids), each step makes one product forward and one backward, and the recurrent weight's gradient
# is one product over all steps. The gates work step by step on (batch, hidden) pieces that stay
# in the CPU's cache. And two things that pay on CPUs with AVX-512 from another vendor than Intel:
#   - float32 products go through oneDNN where PyTorch has it: about twice MKL's rate there, as
#     MKL does not run its AVX-512 code on them;
#   - tanh(a) is computed as 2 sigmoid(2a) - 1 (the same function): torch.tanh goes through MKL's
#     vector maths library, several times slower there than torch.sigmoid.
# tests/test_models.py checks it against nn.RNN / nn.GRU: outputs, state and every gradient.


def _onednn_linear() -> bool:
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except RuntimeError:
        return False


ONEDNN = _onednn_linear()  # whether `_linear` may use oneDNN at all (tests turn it off)


def use_onednn(t: torch.Tensor) -> bool:
    """oneDNN's float32 product applies: a CPU tensor (oneDNN has no GPU kernel here)."""
    return (ONEDNN and t.device.type == "cpu" and t.dtype == torch.float32
            and torch.backends.mkldnn.enabled)


def _packed(w: torch.Tensor, batch: int, uses: int) -> torch.Tensor:
    """w laid out once for `uses` products by `_linear` with `batch` rows: oneDNN's products then
    run 10-15% faster at a batch of 32; the layout costs about two products, so it is worth it
    for a sequence, not for one step (generation)."""
    if uses >= 8 and use_onednn(w):
        return torch.ops.mkldnn._reorder_linear_weight(w, batch)
    return w


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
            add: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ b) (+ add), w (out, in) as nn.Linear keeps it (or `_packed`): oneDNN for float32
    if PyTorch has it, else torch's matmul."""
    if use_onednn(x):
        if add is None:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, w, b, "add")
    if add is None:
        return F.linear(x, w, b)
    out = torch.addmm(add, x, w.t())
    return out if b is None else out.add_(b)


# The recurrent weight's gradient, sum_t d_t^T h_{t-1}: at small batches one product over all
# steps (35 products of 32 rows each run far below the machine's rate); from this batch on, one
# product per step inside the backward loop, while its operands are in cache (the all-steps
# product first has to transpose every h_{t-1}, tens of MB at a batch of 512).
STEPWISE_GRAD_BATCH = 256


def _all_steps_grad(d_pre: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """sum_t d_pre_t^T prev_t from every step at once: (out, in). Made as (prev^T d_pre)^T with
    prev^T copied first: oneDNN copies a transposed left operand itself more slowly, and prev is
    the smaller one."""
    return _linear(prev.flatten(0, 1).t().contiguous(), d_pre.flatten(0, 1).t()).t()


def _add_step_grad(acc: torch.Tensor | None, d_pre: torch.Tensor,
                   prev: torch.Tensor) -> torch.Tensor:
    """acc + prev^T d_pre, one step's share of the same gradient, transposed: (in, out)."""
    x, w = prev.t().contiguous(), d_pre.t()
    return _linear(x, w) if acc is None else _linear(x, w, add=acc)


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x W^T + b for all steps at once: (steps, batch, out). For token ids (steps, batch),
    one_hot(x) W^T + b is a lookup of rows of W^T + b."""
    return F.linear(x, w, b) if x.is_floating_point() else F.embedding(x, w.t() + b)


class Head(torch.autograd.Function):
    """nn.Linear on (rows, in), its forward and input gradient through oneDNN (2-3x MKL's rate on
    these skinny products here), its weight gradient through torch (faster for this shape)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return _linear(x, w, b)

    @staticmethod
    def backward(ctx, d_out):
        x, w = ctx.saved_tensors
        return _linear(d_out, w.t().contiguous()), d_out.t() @ x, d_out.sum(0)


class TanhRecurrence(torch.autograd.Function):
    """h_t = tanh(a_t), a_t = g_t + h_{t-1} W_hh^T, t = 1..steps, where g (steps, batch, hidden)
    holds the input projection and both biases. -> every h_t (steps, batch, hidden), the last."""

    @staticmethod
    def forward(ctx, g, h0, w_hh):
        steps, batch, hidden = g.shape
        hs = g.new_empty(steps + 1, batch, hidden)  # h_0 .. h_steps
        hs[0] = h0
        w2, minus_one = _packed((2 * w_hh).contiguous(), batch, steps), g.new_full((), -1.0)
        for g_t, h_prev, h_t in zip(g, hs[:-1], hs[1:]):  # (batch, hidden) views
            a2 = _linear(h_prev, w2).add_(g_t, alpha=2)  # 2 a_t
            torch.add(minus_one, a2.sigmoid_(), alpha=2, out=h_t)  # 2 sigmoid(2a) - 1
        ctx.save_for_backward(hs, w_hh)
        return hs[1:], hs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_last):
        hs, w_hh = ctx.saved_tensors
        d_out = d_out.contiguous()  # (steps, batch, hidden)
        d_pre = torch.empty_like(d_out)  # dL/da_t
        w_t = _packed(w_hh.t().contiguous(), d_out.shape[1], len(d_out))  # dh_{t-1} = da_t W_hh
        dh = d_out[-1] + d_last  # dL/dh_t: from the output at t and from step t + 1
        d_outs, h_ts, d_pres = d_out.unbind(), hs[1:].unbind(), d_pre.unbind()  # per step
        stepwise, d_w_t = d_out.shape[1] >= STEPWISE_GRAD_BATCH, None
        for t in range(len(d_out) - 1, -1, -1):
            torch.ops.aten.tanh_backward(dh, h_ts[t], grad_input=d_pres[t])  # dh (1 - h_t^2)
            if stepwise:
                d_w_t = _add_step_grad(d_w_t, d_pres[t], hs[t])
            dh = _linear(d_pres[t], w_t, add=d_outs[t - 1]) if t else _linear(d_pres[0], w_t)
        d_w = d_w_t.t() if stepwise else _all_steps_grad(d_pre, hs[:-1])
        return d_pre, dh, d_w


def _rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh):
    """nn.RNN (tanh), one layer: x token ids (steps, batch) or (steps, batch, input)."""
    return TanhRecurrence.apply(_project(x, w_ih, b_ih + b_hh), h0, w_hh)


class GRURecurrence(torch.autograd.Function):
    """nn.GRU's recurrence, gates (r, z, n) as nn.GRU stacks them:

        gh = h_{t-1} W_hh^T + b_hh                               (batch, 3*hidden)
        r_t = sigmoid(gi_r + gh_r),  z_t = sigmoid(gi_z + gh_z)
        n_t = tanh(gi_n + r_t * gh_n)
        h_t = (1 - z_t) * n_t + z_t * h_{t-1}

    gi (steps, batch, 3*hidden) = x W_ih^T + b_ih. -> every h_t (steps, batch, hidden), the last.
    """

    @staticmethod
    def forward(ctx, gi, h0, w_hh, b_hh):
        steps, batch, hidden = gi.shape[0], *h0.shape
        rz_, n_ = slice(0, 2 * hidden), slice(2 * hidden, None)  # gate columns of gi, gh
        hs = gi.new_empty(steps + 1, batch, hidden)  # h_0 .. h_steps
        hs[0] = h0
        rz = gi.new_empty(steps, batch, 2 * hidden)  # (r_t, z_t)
        n = gi.new_empty(steps, batch, hidden)
        w, ghs, minus_one = _packed(w_hh.contiguous(), batch, steps), [], gi.new_full((), -1.0)
        # per step (batch, ...) views, made once
        steps_ = zip(gi[..., rz_], gi[..., n_], rz, rz[..., :hidden], rz[..., hidden:], n,
                     hs[:-1], hs[1:])
        for gi_rz, gi_n, rz_t, r, z, n_t, h_prev, h_t in steps_:
            gh = _linear(h_prev, w, b_hh)  # (batch, 3*hidden)
            torch.add(gi_rz, gh[:, rz_], out=rz_t).sigmoid_()
            q2 = torch.addcmul(gi_n, r, gh[:, n_]).mul_(2)
            torch.add(minus_one, q2.sigmoid_(), alpha=2, out=n_t)  # tanh(q) = 2 sigmoid(2q) - 1
            torch.lerp(n_t, h_prev, z, out=h_t)  # n + z (h - n)
            ghs.append(gh)
        ctx.save_for_backward(hs, rz, n, w_hh)
        ctx.ghs = ghs  # per step, never seen outside: the backward reads gh_n
        return hs[1:], hs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_last):
        hs, rz, n, w_hh = ctx.saved_tensors
        steps, batch, hidden = n.shape
        rz_, n_ = slice(0, 2 * hidden), slice(2 * hidden, None)
        d_gi = d_out.new_empty(steps, batch, 3 * hidden)  # dL/d gi_t = dL/d(r, z, n pre-activ.)
        d_gh = torch.empty_like(d_gi)  # dL/d gh_t: the same but for n: r_t dL/d(n pre-activ.)
        d_rz = d_out.new_empty(batch, 2 * hidden)  # dL/d(r_t, z_t)
        d_r, d_z = d_rz[:, :hidden], d_rz[:, hidden:]
        w_t = _packed(w_hh.t().contiguous(), batch, steps)  # dL/dh_{t-1} = dL/d gh_t W_hh + ...
        # per step (batch, ...) views, made once
        rz_t, r, z, n_t, h_prev = (rz.unbind(), rz[..., :hidden].unbind(),
                                   rz[..., hidden:].unbind(), n.unbind(), hs[:-1].unbind())
        d_gi_rz, d_gi_n = d_gi[..., rz_].unbind(), d_gi[..., n_].unbind()
        d_gh_t, d_gh_rz, d_gh_n = d_gh.unbind(), d_gh[..., rz_].unbind(), d_gh[..., n_].unbind()
        d_outs = d_out.unbind()
        dh = d_out[-1] + d_last  # dL/dh_t: from the output at t and from step t + 1
        stepwise, d_w_t = batch >= STEPWISE_GRAD_BATCH, None
        for t in range(steps - 1, -1, -1):
            d_n = torch.addcmul(dh, dh, z[t], value=-1)  # dh (1 - z)
            d_a = torch.ops.aten.tanh_backward(d_n, n_t[t], grad_input=d_gi_n[t])
            torch.mul(d_a, r[t], out=d_gh_n[t])
            torch.mul(d_a, ctx.ghs[t][:, n_], out=d_r)
            torch.mul(dh, h_prev[t] - n_t[t], out=d_z)
            torch.ops.aten.sigmoid_backward(d_rz, rz_t[t], grad_input=d_gh_rz[t])
            d_gi_rz[t].copy_(d_gh_rz[t])
            direct = torch.addcmul(d_outs[t - 1], dh, z[t]) if t else dh * z[0]  # via z h
            if stepwise:
                d_w_t = _add_step_grad(d_w_t, d_gh_t[t], h_prev[t])
            dh = _linear(d_gh_t[t], w_t, add=direct)
        d_w = d_w_t.t() if stepwise else _all_steps_grad(d_gh, hs[:-1])
        return d_gi, dh, d_w, d_gh.sum((0, 1))


def _gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh):
    """nn.GRU, one layer: x token ids (steps, batch) or (steps, batch, input)."""
    return GRURecurrence.apply(_project(x, w_ih, b_ih), h0, w_hh, b_hh)


FUSED = {nn.RNN: _rnn_layer, nn.GRU: _gru_layer}  # nn.LSTM: its own oneDNN kernel
