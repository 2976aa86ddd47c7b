"""The fused CPU path of the `rnn` and `gru` cells: the same function as nn.RNN / nn.GRU (and
the scratch cells), faster on the CPU.

One torch.autograd.Function per layer with a hand-written backward: the input projection of all
steps before the loop (a row lookup for one-hot input), one product per step forward and one
backward, the recurrent weight's gradient as one product over all steps (or step by step from a
batch of STEPWISE_GRAD_BATCH), each float32 product through MKL or oneDNN, whichever measured
faster for its shape on this machine (rnnlab/kernels/choice.py). Whether the fused path runs at
all is measured too, against nn.RNN / nn.GRU (rnnlab/models/dispatch.py).
tests/models/test_models.py holds it equal to nn.* and the scratch loop, forward and backward,
whichever library runs the products. docs/benchmark.md measures it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from rnnlab.kernels import choice


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
# in the CPU's cache. tanh(a) is computed as 2 sigmoid(2a) - 1 (the same function): torch.tanh
# goes through MKL's vector maths library, several times slower than torch.sigmoid on AMD CPUs
# with AVX-512.
# tests/models/test_models.py checks it against nn.RNN / nn.GRU: outputs, state and every
# gradient.


def _onednn_linear() -> bool:
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except RuntimeError:
        return False


ONEDNN = _onednn_linear()  # whether `_linear` may use oneDNN at all (tests turn it off)


def use_onednn(t: torch.Tensor) -> bool:
    """oneDNN's float32 product is a candidate: a CPU tensor (oneDNN has no GPU kernel here)."""
    return (ONEDNN and t.device.type == "cpu" and t.dtype == torch.float32
            and torch.backends.mkldnn.enabled)


# Every float32 product below goes through the library measured fastest for its shape on this
# machine (rnnlab/kernels/choice.py): MKL (torch's matmul) or oneDNN. Neither wins on every CPU
# (docs/kernels.md).
PACK_USES = 8  # oneDNN's weight layout costs about two products: worth it for a sequence


def _mkl(x, w, b=None, add=None):
    """x @ w^T (+ b) (+ add) through torch's matmul."""
    if add is None:
        return F.linear(x, w, b)
    out = torch.addmm(add, x, w.t())
    return out if b is None else out.add_(b)


def _onednn(x, w, b=None, add=None):
    """The same through oneDNN (w as nn.Linear keeps it, or laid out by `Product`)."""
    if add is None:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, add, w, b, "add")


LIBRARIES = {"mkl": _mkl, "onednn": _onednn}  # the first is the reference


def _shape(x: torch.Tensor, w: torch.Tensor) -> str:
    return (f"{x.shape[0]}x{x.shape[1]} @ {w.shape[1]}x{w.shape[0]} {str(x.dtype)[6:]}"
            f"{'' if x.is_contiguous() else ' x-strided'}"
            f"{'' if w.is_contiguous() else ' w-strided'}")


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
            add: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ b) (+ add), w (out, in) as nn.Linear keeps it, through the library measured
    fastest for this shape (timed on these very arguments the first time)."""
    if not use_onednn(x):
        return _mkl(x, w, b, add)
    key = _shape(x, w) + ("" if b is None else " +bias") + ("" if add is None else " +add")
    library = choice.choose("product", key, {name: functools.partial(f, x, w, b, add)
                                              for name, f in LIBRARIES.items()})
    return LIBRARIES[library](x, w, b, add)


class Product:
    """x @ w^T (+ b) (+ add) for the `uses` products of a sequence, each x (rows, in): the
    library chosen once (measured on this shape the first time), and for oneDNN, from PACK_USES
    products on, w laid out once for it."""

    def __init__(self, w: torch.Tensor, rows: int, uses: int):
        self.w, self.library = w, _mkl
        if not use_onednn(w):
            return
        x = torch.rand(rows, w.shape[1], dtype=w.dtype, generator=torch.Generator().manual_seed(0))
        packed = (torch.ops.mkldnn._reorder_linear_weight(w, rows) if uses >= PACK_USES else w)
        key = _shape(x, w) + (" packed" if packed is not w else "")
        library = choice.choose("product", key, {"mkl": functools.partial(_mkl, x, w),
                                                  "onednn": functools.partial(_onednn, x, packed)})
        if library == "onednn":
            self.w, self.library = packed, _onednn

    def __call__(self, x: torch.Tensor, b: torch.Tensor | None = None,
                 add: torch.Tensor | None = None) -> torch.Tensor:
        return self.library(x, self.w, b, add)


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
    """nn.Linear on (rows, in), its forward and input gradient through the library measured
    faster for the shape, its weight gradient through torch."""

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
        w2, minus_one = Product((2 * w_hh).contiguous(), batch, steps), g.new_full((), -1.0)
        for g_t, h_prev, h_t in zip(g, hs[:-1], hs[1:]):  # (batch, hidden) views
            a2 = w2(h_prev).add_(g_t, alpha=2)  # 2 a_t
            torch.add(minus_one, a2.sigmoid_(), alpha=2, out=h_t)  # 2 sigmoid(2a) - 1
        ctx.save_for_backward(hs, w_hh)
        return hs[1:], hs[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_last):
        hs, w_hh = ctx.saved_tensors
        d_out = d_out.contiguous()  # (steps, batch, hidden)
        d_pre = torch.empty_like(d_out)  # dL/da_t
        w_t = Product(w_hh.t().contiguous(), d_out.shape[1], len(d_out))  # dh_{t-1} = da_t W_hh
        dh = d_out[-1] + d_last  # dL/dh_t: from the output at t and from step t + 1
        d_outs, h_ts, d_pres = d_out.unbind(), hs[1:].unbind(), d_pre.unbind()  # per step
        stepwise, d_w_t = d_out.shape[1] >= STEPWISE_GRAD_BATCH, None
        for t in range(len(d_out) - 1, -1, -1):
            torch.ops.aten.tanh_backward(dh, h_ts[t], grad_input=d_pres[t])  # dh (1 - h_t^2)
            if stepwise:
                d_w_t = _add_step_grad(d_w_t, d_pres[t], hs[t])
            dh = w_t(d_pres[t], add=d_outs[t - 1]) if t else w_t(d_pres[0])
        d_w = d_w_t.t() if stepwise else _all_steps_grad(d_pre, hs[:-1])
        return d_pre, dh, d_w


def rnn_layer(recurrence, x, state, w_ih, w_hh, b_ih, b_hh):
    """nn.RNN (tanh), one layer, `recurrence` TanhRecurrence or its compiled twin: x token ids
    (steps, batch) or (steps, batch, input), state (h0,) -> outputs, (h,)."""
    outputs, h = recurrence.apply(_project(x, w_ih, b_ih + b_hh), state[0], w_hh)
    return outputs, (h,)


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
        w, ghs, minus_one = Product(w_hh.contiguous(), batch, steps), [], gi.new_full((), -1.0)
        # per step (batch, ...) views, made once
        steps_ = zip(gi[..., rz_], gi[..., n_], rz, rz[..., :hidden], rz[..., hidden:], n,
                     hs[:-1], hs[1:])
        for gi_rz, gi_n, rz_t, r, z, n_t, h_prev, h_t in steps_:
            gh = w(h_prev, b_hh)  # (batch, 3*hidden)
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
        w_t = Product(w_hh.t().contiguous(), batch, steps)  # dL/dh_{t-1} = dL/d gh_t W_hh + ...
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
            dh = w_t(d_gh_t[t], add=direct)
        d_w = d_w_t.t() if stepwise else _all_steps_grad(d_gh, hs[:-1])
        return d_gi, dh, d_w, d_gh.sum((0, 1))


def gru_layer(recurrence, x, state, w_ih, w_hh, b_ih, b_hh):
    """nn.GRU, one layer, `recurrence` GRURecurrence or its compiled twin: x as `rnn_layer`,
    state (h0,) -> outputs, (h,)."""
    outputs, h = recurrence.apply(_project(x, w_ih, b_ih), state[0], w_hh, b_hh)
    return outputs, (h,)


def lstm_layer(recurrence, x, state, w_ih, w_hh, b_ih, b_hh):
    """nn.LSTM, one layer, by the compiled recurrence (rnnlab/kernels/native.py's NativeLSTM; in
    Python nn.LSTM's own kernel is faster, so it has no twin here): x as `rnn_layer`, state
    (h0, c0) -> outputs, (h, c)."""
    outputs, h, c = recurrence.apply(_project(x, w_ih, b_ih + b_hh), *state, w_hh)
    return outputs, (h, c)


# cell -> one layer's function of (recurrence, x, state, w_ih, w_hh, b_ih, b_hh), as nn.* keeps
# the weights; and the Python recurrences (rnnlab/kernels/native.py has the compiled ones)
LAYERS = {"rnn": rnn_layer, "gru": gru_layer, "lstm": lstm_layer}
RECURRENCES = {"rnn": TanhRecurrence, "gru": GRURecurrence}
