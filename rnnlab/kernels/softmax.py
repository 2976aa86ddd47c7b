"""The output layer and its cross-entropy in one step, for large vocabularies:

    linear_cross_entropy(x, weight, bias, targets) = sum_i -log softmax(x W^T + b)_i[targets_i]

the same number and gradients as F.cross_entropy(F.linear(x, weight, bias), targets,
reduction="sum"), with one (rows, vocab) buffer where PyTorch writes four: the forward turns the
logits into softmax in place, the backward turns that into G = p - onehot(targets) in place and
applies the loss's gradient through the small operands (x, d_x, d_b), never through G. Rows whose
p[target] underflows (a target logit 87 below the log-sum-exp in float32) are recomputed the
plain way. The logits' product goes through `_linear` (oneDNN or MKL, as measured here), both
gradients' products through torch's mm, which ran them faster. The backward uses up the buffer:
a second backward through one graph raises an error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rnnlab.kernels.fused import _linear


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
    @once_differentiable  # create_graph=True: an error, not a wrong second derivative
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
        d_x = (g @ weight).mul_(d_loss) if need_x else None  # G W (rows, in)
        d_w = g.t() @ (x * d_loss) if need_w else None  # G^T x (vocab, in)
        d_b = g.sum(0).mul_(d_loss) if need_b and ctx.has_bias else None
        return d_x, d_w, d_b, None
