"""The book's implementation, as d2l writes it (PyTorch edition, 8.5, 8.6, 9.1-9.3): the yardstick.

Kept as the book has it, quirks included (one-hot input built every minibatch, the scratch RNN's
per-step output layer, the gradient norm summed in Python, the loss read back every minibatch).
Only the training step is here; the data is the project's, the same minibatches for both sides.

    model = book_model(cell, vocab_size, hidden_size, num_layers)  # RNNModel(nn.RNN/GRU/LSTM)
    model = BookScratchRNN(vocab_size, hidden_size)                # RNNModelScratch + rnn()
    step = book_step(model, lr=1)  # step(X, Y): train_epoch_ch8's loop body -> mean loss so far
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

BOOK_LAYERS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RNNModel(nn.Module):
    """d2l 8.6: a recurrent layer of torch's and a Linear output layer."""

    def __init__(self, rnn_layer: nn.RNNBase, vocab_size: int):
        super().__init__()
        self.rnn = rnn_layer
        self.vocab_size = vocab_size
        self.num_hiddens = self.rnn.hidden_size
        self.num_directions = 1
        self.linear = nn.Linear(self.num_hiddens, self.vocab_size)

    def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size)
        X = X.to(torch.float32)
        Y, state = self.rnn(X, state)
        # The fully connected layer first changes the shape of `Y` to
        # (`num_steps` * `batch_size`, `num_hiddens`)
        output = self.linear(Y.reshape((-1, Y.shape[-1])))
        return output, state

    def begin_state(self, device, batch_size=1):
        if not isinstance(self.rnn, nn.LSTM):
            return torch.zeros((self.num_directions * self.rnn.num_layers, batch_size,
                                self.num_hiddens), device=device)
        return (torch.zeros((self.num_directions * self.rnn.num_layers, batch_size,
                             self.num_hiddens), device=device),
                torch.zeros((self.num_directions * self.rnn.num_layers, batch_size,
                             self.num_hiddens), device=device))


def book_model(cell: str, vocab_size: int, num_hiddens: int, num_layers: int = 1) -> RNNModel:
    """`RNNModel(nn.RNN(vocab_size, num_hiddens, num_layers), vocab_size)`, and GRU, LSTM alike."""
    return RNNModel(BOOK_LAYERS[cell](vocab_size, num_hiddens, num_layers), vocab_size)


# --- d2l 8.5: the RNN from scratch ----------------------------------------------------------------


def get_params(vocab_size, num_hiddens, device):
    num_inputs = num_outputs = vocab_size

    def normal(shape):
        return torch.randn(size=shape, device=device) * 0.01

    # Hidden layer parameters
    W_xh = normal((num_inputs, num_hiddens))
    W_hh = normal((num_hiddens, num_hiddens))
    b_h = torch.zeros(num_hiddens, device=device)
    # Output layer parameters
    W_hq = normal((num_hiddens, num_outputs))
    b_q = torch.zeros(num_outputs, device=device)
    # Attach gradients
    params = [W_xh, W_hh, b_h, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_rnn_state(batch_size, num_hiddens, device):
    return (torch.zeros((batch_size, num_hiddens), device=device),)


def rnn(inputs, state, params):
    # Here `inputs` shape: (`num_steps`, `batch_size`, `vocab_size`)
    W_xh, W_hh, b_h, W_hq, b_q = params
    H, = state
    outputs = []
    # Shape of `X`: (`batch_size`, `vocab_size`)
    for X in inputs:
        H = torch.tanh(torch.mm(X, W_xh) + torch.mm(H, W_hh) + b_h)
        Y = torch.mm(H, W_hq) + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H,)


class RNNModelScratch:
    """A RNN Model implemented from scratch."""

    def __init__(self, vocab_size, num_hiddens, device, get_params, init_state, forward_fn):
        self.vocab_size, self.num_hiddens = vocab_size, num_hiddens
        self.params = get_params(vocab_size, num_hiddens, device)
        self.init_state, self.forward_fn = init_state, forward_fn

    def __call__(self, X, state):
        X = F.one_hot(X.T, self.vocab_size).type(torch.float32)
        return self.forward_fn(X, state, self.params)

    def begin_state(self, batch_size, device):
        return self.init_state(batch_size, self.num_hiddens, device)


def BookScratchRNN(vocab_size: int, num_hiddens: int, device="cpu") -> RNNModelScratch:
    return RNNModelScratch(vocab_size, num_hiddens, device, get_params, init_rnn_state, rnn)


# --- d2l 8.5: training ----------------------------------------------------------------------------


def grad_clipping(net, theta):
    """Clip the gradient."""
    if isinstance(net, nn.Module):
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        params = net.params
    norm = torch.sqrt(sum(torch.sum((p.grad ** 2)) for p in params))
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


def sgd(params, lr, batch_size):
    """Minibatch stochastic gradient descent."""
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


def book_step(net, lr: float, theta: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The body of d2l's `train_epoch_ch8` (sequential partitioning: the state is carried over
    and detached in place), as a function of one minibatch (X, Y), each (batch, steps)."""
    loss = nn.CrossEntropyLoss()
    if isinstance(net, nn.Module):
        updater = torch.optim.SGD(net.parameters(), lr)
    else:
        def updater(batch_size):
            return sgd(net.params, lr, batch_size)
    metric = [0.0, 0.0]  # d2l.Accumulator(2): sum of losses, number of tokens
    state = None

    def step(X, Y):
        nonlocal state
        if state is None:
            device = X.device
            state = net.begin_state(batch_size=X.shape[0], device=device)
        else:
            if isinstance(net, nn.Module) and not isinstance(state, tuple):
                # `state` is a tensor for `nn.GRU`
                state.detach_()
            else:
                # `state` is a tuple of tensors for `nn.LSTM` and for our custom scratch
                # implementation
                for s in state:
                    s.detach_()
        y = Y.T.reshape(-1)
        y_hat, state = net(X, state)
        l = loss(y_hat, y.long()).mean()
        if isinstance(updater, torch.optim.Optimizer):
            updater.zero_grad()
            l.backward()
            grad_clipping(net, theta)
            updater.step()
        else:
            l.backward()
            grad_clipping(net, theta)
            # Since the `mean` function has been invoked
            updater(batch_size=1)
        # metric.add(l * y.numel(), y.numel()): the Accumulator reads the loss back as a float
        metric[0] += float((l * y.numel()).detach())
        metric[1] += y.numel()
        return metric[0] / metric[1]

    return step
