"""Floating-point operations per token of a model, and the speed they bound.

Only matrix products are counted (2 FLOPs per multiply-add); the elementwise gates, the softmax
and the optimizer step are a few operations per hidden unit and are left out. Per token and layer,
with G gates (rnn 1, gru 3, lstm 4), hidden size H, vocabulary V:

    input projection   2 * I * G*H   I = embed_size or the previous layer's H; 0 for the first layer
                                     with one-hot input: a row lookup (W_ih[token]) multiplies
                                     nothing. The book's one-hot product costs 2 * V * G*H; count it
                                     with `one_hot_matmul=True` (it is work the book does, not work
                                     the model needs).
    recurrent          2 * H * G*H
    output layer       2 * H * V     (once, after the last layer)

Training costs about three forward passes: the forward itself, and in the backward one product
for the gradient of each layer's input and one for the gradient of its weight. (An embedding's
own gradient is a scatter-add of rows, not a product: not counted.)
"""

from __future__ import annotations

from rnnlab.models.lm import ModelConfig

GATES = {"rnn": 1, "gru": 3, "lstm": 4}  # matrices per layer: nn.RNN 1, nn.GRU 3, nn.LSTM 4
TRAIN_FACTOR = 3  # forward + backward (input gradient + weight gradient)


def forward_flops(cfg: ModelConfig, one_hot_matmul: bool = False) -> dict[str, int]:
    """FLOPs per token of one forward pass, by part: input, recurrent, output."""
    width = GATES[cfg.cell] * cfg.hidden_size  # G*H: every gate's pre-activation at once
    first_in = cfg.embed_size or (cfg.vocab_size if one_hot_matmul else 0)
    inputs = 2 * first_in * width + (cfg.num_layers - 1) * 2 * cfg.hidden_size * width
    return {
        "input": inputs,
        "recurrent": cfg.num_layers * 2 * cfg.hidden_size * width,
        "output": 2 * cfg.hidden_size * cfg.vocab_size,
    }


def train_flops(cfg: ModelConfig, one_hot_matmul: bool = False) -> int:
    """FLOPs per token of one training step (forward and backward)."""
    return TRAIN_FACTOR * sum(forward_flops(cfg, one_hot_matmul).values())


def bound_tokens_per_sec(flops_per_token: float, flops_per_sec: float) -> float:
    """The most tokens per second a machine doing `flops_per_sec` can train."""
    return flops_per_sec / flops_per_token

