"""The epoch loop: truncated BPTT, gradient clipping by global norm, perplexity.

`run_epochs` is a generator: it trains one epoch at a time and yields its numbers, so the caller
(stages/train.py) decides what to record and save between epochs. All the state that a resumed
run needs lives in a `TrainState`, whose `snapshot()` is what a resumable checkpoint stores.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from rnnlab.batches import SAMPLERS, min_tokens, num_batches
from rnnlab.config import Train
from rnnlab.errors import UserError
from rnnlab.fileio import repo_root
from rnnlab.models import RNNLM, detach_state
from rnnlab.threads import auto_threads


MAX_LOSS = 700.0  # exp(700) is near float64's limit: a mean loss beyond it means divergence


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_ppl: float
    val_ppl: float
    tokens_per_sec: float  # training tokens per second of training (validation excluded)
    grad_norm: float       # mean global gradient norm before clipping
    clipped_frac: float    # fraction of steps whose gradient was clipped
    lr: float              # learning rate at the end of the epoch
    seconds: float         # wall time of the epoch, validation included
    is_best: bool          # best validation perplexity so far


@dataclass
class TrainState:
    model: RNNLM
    optimizer: torch.optim.Optimizer
    gen: torch.Generator                 # minibatch order and offsets
    epoch: int = 0                       # epochs completed
    history: list[dict] = field(default_factory=list)
    best_val_ppl: float = math.inf
    best_epoch: int = 0

    def snapshot(self) -> dict:
        """Everything needed to continue after the last completed epoch, bit for bit."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "history": self.history,
            "best_val_ppl": self.best_val_ppl,
            "best_epoch": self.best_epoch,
        }

    def restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.gen.set_state(snap["gen"])
        torch.set_rng_state(snap["torch_rng"])
        self.epoch = snap["epoch"]
        self.history = list(snap["history"])
        self.best_val_ppl = snap["best_val_ppl"]
        self.best_epoch = snap["best_epoch"]


def prepare_torch(cfg: Train) -> torch.device:
    """Apply the thread setting and pick the device. `auto` shares the cores among the trainings
    that run at once (rnnlab/threads.py); it is chosen here, once, and kept for the whole run."""
    if cfg.threads == "auto":
        threads, why = auto_threads(repo_root())
        torch.set_num_threads(threads)
        print(f"threads: {threads} ({why})")
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)
    return resolve_device(cfg.device)


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def make_optimizer(model: nn.Module, cfg: Train) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def new_state(model: RNNLM, cfg: Train) -> TrainState:
    return TrainState(model, make_optimizer(model, cfg), torch.Generator().manual_seed(cfg.seed))


def lr_at(cfg: Train, progress: float) -> float:
    """Learning rate after `progress` (0..1) of the whole run."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr


def check_fits(n_tokens: int, cfg: Train) -> None:
    """A training split too short for one minibatch is a settings mistake; say which."""
    need = min_tokens(cfg.batch_size, cfg.num_steps)
    if n_tokens < need:
        raise UserError(
            f"train.batch_size = {cfg.batch_size} with train.num_steps = {cfg.num_steps} needs at "
            f"least {need:,} training tokens, but the training split has {n_tokens:,}; lower "
            "batch_size or num_steps, or enlarge the split (tokenize.split.train, data.max_tokens)"
        )


def autocast(device: torch.device, cfg: Train):
    """bf16 autocast on CUDA when asked for; a no-op elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


def train_step(model: RNNLM, x: torch.Tensor, y: torch.Tensor, h, opt: torch.optim.Optimizer,
               clip_theta: float, bf16: bool = False):
    """One minibatch from state h (detached, or None): forward, loss, backward, clip, step.

    Returns (new state, loss, gradient norm before clipping), all tensors: no host sync.
    The benchmark (bench/benchmark.py) times exactly this function.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16 and x.device.type == "cuda"):
        logits, h = model(x, h)  # (batch, num_steps, vocab)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip_theta)  # global L2 norm
    opt.step()
    return h, loss.detach(), norm


def run_epochs(state: TrainState, train_ids: torch.Tensor, val_ids: torch.Tensor, cfg: Train,
               device: torch.device) -> Iterator[EpochResult]:
    """Train from `state.epoch + 1` to `cfg.epochs`, yielding each epoch's numbers."""
    check_fits(len(train_ids), cfg)
    model, opt = state.model, state.optimizer
    train_ids, val_ids = train_ids.to(device), val_ids.to(device)
    sampler = SAMPLERS[cfg.sampling]
    per_epoch = num_batches(len(train_ids), cfg.batch_size, cfg.num_steps)

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        start = time.perf_counter()
        model.train()
        window, norms = [], []  # per-step tensors, looked at every 25 steps: few host syncs
        loss_sum = torch.zeros((), device=device)
        n_tokens, lr, h = 0, cfg.lr, None
        batches = sampler(train_ids, cfg.batch_size, cfg.num_steps, state.gen)
        for step, (x, y) in enumerate(tqdm(batches, total=per_epoch, leave=False, disable=None,
                                           desc=f"epoch {epoch}", unit="batch"), start=1):
            lr = lr_at(cfg, (epoch - 1 + step / per_epoch) / cfg.epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            # sequential: carry the state across minibatches, detached to truncate BPTT;
            # random: rows are unrelated to the previous minibatch's, so start from zeros.
            h = detach_state(h) if (cfg.sampling == "sequential" and h is not None) else None
            h, loss, norm = train_step(model, x, y, h, opt, cfg.clip_theta, cfg.bf16)
            norms.append(norm)
            window.append(loss)
            n_tokens += y.numel()
            if step % 25 == 0:
                loss_sum += _checked_sum(window, epoch, step - len(window) + 1)
                window = []
        loss_sum += _checked_sum(window, epoch, len(norms) - len(window) + 1)
        train_seconds = time.perf_counter() - start

        norms_t = torch.stack(norms)
        train_loss = float(loss_sum) / len(norms)  # every minibatch has the same size
        val_ppl = perplexity(model, val_ids, cfg.batch_size, cfg.num_steps, device, cfg)
        if not math.isfinite(val_ppl) or train_loss > MAX_LOSS:
            raise UserError(
                f"training diverged: after epoch {epoch} the training loss is {train_loss:.4g} and "
                f"the validation perplexity {val_ppl:.4g}; lower train.lr or train.clip_theta and "
                "run again (nothing of this epoch was saved)"
            )
        is_best = val_ppl < state.best_val_ppl
        if is_best:
            state.best_val_ppl, state.best_epoch = val_ppl, epoch
        result = EpochResult(
            epoch=epoch,
            train_ppl=math.exp(train_loss),
            val_ppl=val_ppl,
            tokens_per_sec=n_tokens / train_seconds,
            grad_norm=float(norms_t.mean()),
            clipped_frac=float((norms_t > cfg.clip_theta).float().mean()),
            lr=lr,
            seconds=time.perf_counter() - start,
            is_best=is_best,
        )
        state.epoch = epoch
        state.history.append(asdict(result))
        yield result


def _checked_sum(losses: list[torch.Tensor], epoch: int, first_step: int) -> torch.Tensor | float:
    """Sum of the steps' losses; stop at once on a NaN or infinite one, naming where it was."""
    if not losses:
        return 0.0
    stacked = torch.stack(losses)
    bad = (~torch.isfinite(stacked)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise UserError(
            f"training diverged: the loss became {float(stacked[i]):g} at epoch {epoch}, step "
            f"{first_step + i}; lower train.lr or train.clip_theta and run again "
            "(nothing of this epoch was saved)"
        )
    return stacked.sum()


@torch.no_grad()
def perplexity(model: RNNLM, ids: torch.Tensor, batch_size: int, num_steps: int,
               device: torch.device | None = None, cfg: Train | None = None) -> float:
    """exp(mean next-token cross-entropy) over `ids`, read as `batch_size` contiguous rows.

    Each row is read left to right with the state carried, so every prediction but the first of
    a row sees all the row's text before it. Deterministic: no offsets, no shuffling.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    ids = ids.to(device)
    rows = max(1, min(batch_size, (len(ids) - 1) // max(1, num_steps)))
    row_len = (len(ids) - 1) // rows
    xs = ids[: rows * row_len].view(rows, row_len)
    ys = ids[1 : 1 + rows * row_len].view(rows, row_len)
    total, count, h = torch.zeros((), dtype=torch.float64, device=device), 0, None
    for i in range(0, row_len, num_steps):
        x, y = xs[:, i : i + num_steps], ys[:, i : i + num_steps]
        with autocast(device, cfg) if cfg else torch.autocast(device.type, enabled=False):
            logits, h = model(x, h)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        count += y.numel()
    model.train(was_training)
    mean = float(total) / count
    return math.exp(mean) if mean <= MAX_LOSS else math.inf
