"""Floating-point operations per token of a model, and the tokens/s they bound.

Only matrix products count (2 FLOPs per multiply-add); gates, softmax and the optimizer are left
out. Per token and layer, with G gates (rnn 1, gru 3, lstm 4), hidden size H, vocabulary V: the
input projection 2 * I * G*H (I: embed_size or the layer below's H; 0 for one-hot input, a row
lookup, unless `one_hot_matmul` counts the book's one-hot product 2 * V * G*H), the recurrent
product 2 * H * G*H, and once the output layer 2 * H * V. Training costs three forward passes:
the forward, and the gradients of each product's input and of its weight.
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

