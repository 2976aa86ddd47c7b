"""The output layer and its cross-entropy in one step, for large vocabularies:

    linear_cross_entropy(x, weight, bias, targets) = sum_i -log softmax(x W^T + b)_i[targets_i]

the same number as F.cross_entropy(F.linear(x, weight, bias), targets, reduction="sum"), and the
same gradients, with less work on the (rows, vocab) matrix between the products. At a 10,000-word
vocabulary that matrix is 16 MB per 400 rows; PyTorch writes it four times (logits, log_softmax,
nll_loss's zero gradient, log_softmax's gradient) and exponentiates it twice. Here it is one buffer:

    forward   logits = x W^T + b, turned into softmax in place (one fused pass per row: max, exp,
              sum, scale); loss_i = -log p_i[target_i]
    backward  G = p - onehot(targets) in the same buffer (one write per row);
              d_x = G W, d_W = G^T x, d_b = G.sum(0), the loss's gradient applied through the
              small operands (x, d_x, d_b), never through G

-log p[target] is as exact as log_softmax (p's relative error of a few ulp is its log's absolute
error) while p[target] is a normal float; rows where it is not (a target logit 87 below the
log-sum-exp in float32, 708 in float64, 9.7 in float16) are recomputed the plain way: rare but for
a badly wrong model, or float16. The backward uses up the forward's buffer, so a second backward
through one graph raises an error (compute the loss again instead).

Measured on this repository's 2-core AMD EPYC (shared: medians swing 2-3x with other load), rows
400, in 200, vocab 10,000, float32, torch.set_num_threads(2), median (least) of 20-41 runs
alternated between the sides, in ms:

  Softmax in the forward, rather than saving the logits and their log-sum-exp and exponentiating
  in the backward: one exp per element instead of two.
      softmax in place                          4.0 (3.5)
      logsumexp + sub_(lse).exp_() backward    14.5 (7.0) + 5.0 (3.9)
      log_softmax in place + exp_() backward    3.9 (3.2) + 3.5 (2.9)

  The three products (oneDNN: torch.ops.mkldnn._linear_pointwise as rnnlab/kernels/fused.py's `_linear`
  calls it), median of the per-pair ratios oneDNN / torch over 41 pairs:
      logits  x W^T + b   oneDNN 17.6 (14.2)   torch addmm  25.4 (19.7)   ratio 0.70
      d_x     G W         oneDNN 17.7 (16.3)   torch mm     17.0 (13.5)   ratio 1.05-1.23
      d_W     G^T x       oneDNN 22.9 (20.5)   torch mm     17.7 (15.9)   ratio 1.29
  (oneDNN for d_x with W^T as a strided view; copying W^T first, as fused.Head does, costs more.
  For d_W oneDNN makes (x^T G)^T, whose copy to W's layout autograd would make anyway.) So the
  logits go through `_linear` (oneDNN for float32 where PyTorch has it, else torch), both
  gradients' products through torch's mm.

  Forward + backward (of the mean), three runs of 31 rounds:
      F.cross_entropy(F.linear(x, w, b))        77.6-87.2 (61.4-62.9)
      F.cross_entropy(fused.Head(x, w, b))      87.5-92.6 (57.2-67.0)
      linear_cross_entropy                      56.3-73.6 (45.1-52.6), x0.68-0.80 of the first
  Forward only, torch.no_grad: 24.2-27.0 / 19.3-21.1 / 18.3-21.0 (x0.74-0.77).
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
