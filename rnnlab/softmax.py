"""The output layer and its cross-entropy in one step, for large vocabularies:

    linear_cross_entropy(x, weight, bias, targets) = sum_i -log softmax(x W^T + b)_i[targets_i]

the same number as F.cross_entropy(F.linear(x, weight, bias), targets, reduction="sum"), and the
same gradients, with less work on the (rows, vocab) matrix between the products. At a 10,000-word
vocabulary that matrix is 16 MB per 400 rows: PyTorch writes it four times (logits, log_softmax,
nll_loss's zero gradient, log_softmax's gradient) and exponentiates it twice. Here it is one buffer:

    forward   logits = x W^T + b, turned into softmax in place (one fused pass: max, exp, sum,
              scale); loss_i = -log p_i[target_i]
    backward  G = p - onehot(targets) in the same buffer (one write per row),
              d_x = G W, d_W = G^T x, d_b = G.sum(0), each scaled by the loss's gradient
              through its small operand (x, d_x, d_b), never through G

-log p[target] is as exact as log_softmax (relative error of p a few ulp: absolute error of its log
the same) until p[target] leaves the normal range (a target logit 87 below the log-sum-exp in
float32, 708 in float64); those rows, rare and only from a badly wrong model, are recomputed the
plain way. The backward uses up the forward's buffer, so a second backward through one graph
raises an error (compute the loss again instead).

Why softmax in the forward rather than the logits plus their log-sum-exp (undone into softmax by
the backward): it is one exp per element instead of two. Per call, 400 x 10,000 float32, two
threads, the least of 21 alternated runs (medians on this shared CPU are 3-10x these, see below):
softmax in place 2.7 ms; logsumexp 4.3 ms forward + sub_(lse).exp_() 3.0 ms backward; log_softmax
in place 2.5 ms + exp_() 2.3 ms.

The three products, 400 x 200 against 10,000 x 200, float32, two threads, least of 21 runs:
    logits   oneDNN (fused._linear)        13.4 ms   torch addmm        19.6 ms
    d_x      oneDNN, W^T as a strided view 15.0 ms   torch mm  G @ W    18.2 ms
    d_W      oneDNN, (x^T G)^T + copy      ...       torch mm G^T @ x   ...
so the first two go through `fused._linear` (oneDNN for float32 where PyTorch has it, else
torch), ...

Forward + backward at rows 400, in 200, vocab 10,000, float32, torch.set_num_threads(2):
    ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rnnlab.fused import _linear


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """sum over rows of -log softmax(x W^T + b)[target]: a 0-dim tensor of x's dtype (divide by
    len(targets) for the mean). x (rows, in), weight (vocab, in) as nn.Linear keeps it, bias
    (vocab,) or None, targets (rows,) int64 in [0, vocab). Without grad (torch.no_grad, or
    nothing that requires it) only the loss is computed."""
    if x.dim() != 2 or targets.shape != x.shape[:1]:
        raise ValueError(f"linear_cross_entropy takes x (rows, in) and targets (rows,), "
                         f"got x {tuple(x.shape)} and targets {tuple(targets.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias)):
        return LinearCrossEntropy.apply(x, weight, bias, targets)
    return _softmax_and_loss(x, weight, bias, targets)[0]


def _softmax_and_loss(x, weight, bias, targets):
    """-> the summed loss, softmax(x W^T + b) (rows, vocab)."""
    probs = _linear(x, weight, bias)  # (rows, vocab) logits ...
    torch.softmax(probs, 1, out=probs)  # ... turned into softmax in place
    p_target = probs.gather(1, targets[:, None]).squeeze(1)  # (rows,)
    losses = p_target.log().neg_()
    # -log p loses precision once p is subnormal and is inf once p underflows: such rows again,
    # the plain way (their logits are gone)
    low = p_target < torch.finfo(probs.dtype).tiny
    if low.any():
        losses[low] = F.cross_entropy(F.linear(x[low], weight, bias), targets[low],
                                      reduction="none")
    return losses.sum(), probs


class LinearCrossEntropy(torch.autograd.Function):
    """`linear_cross_entropy` with its backward by hand; the (rows, vocab) softmax saved by the
    forward becomes the logits' gradient in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets):
        loss, probs = _softmax_and_loss(x, weight, bias, targets)
        ctx.save_for_backward(x, weight, targets, probs)
        ctx.has_bias, ctx.spent = bias is not None, False
        return loss

    @staticmethod
    def backward(ctx, d_loss):
        if ctx.spent:  # checked first: unpacking the spent buffer would blame an in-place op
            raise RuntimeError(
                "linear_cross_entropy: a second backward through the same graph; the first one "
                "turned the saved (rows, vocab) softmax into its gradient in place. Compute the "
                "loss again for another backward")
        ctx.spent = True
        x, weight, targets, probs = ctx.saved_tensors
        g = probs  # (rows, vocab): G = softmax - onehot(targets), in place
        g[torch.arange(len(targets), device=g.device), targets] -= 1
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        d_x = _linear(g, weight.t()).mul_(d_loss) if need_x else None  # G W (rows, in)
        d_w = g.t() @ (x * d_loss) if need_w else None  # G^T x (vocab, in)
        d_b = g.sum(0).mul_(d_loss) if need_b and ctx.has_bias else None
        return d_x, d_w, d_b, None
