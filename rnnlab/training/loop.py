"""The epoch loop: truncated BPTT, gradient clipping by global norm, perplexity.

`run_epochs` is a generator: it trains one epoch at a time and yields its numbers, so the caller
(stages/train.py) decides what to record and save between epochs. All the state that a resumed
run needs lives in a `TrainState`, whose `snapshot()` is what a resumable checkpoint stores.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from rnnlab import phases
from rnnlab.config import Train
from rnnlab.data.batches import SAMPLERS, min_tokens, num_batches
from rnnlab.data.corpus import SPLITS
from rnnlab.errors import UserError
from rnnlab.fileio import repo_root
from rnnlab.models.dispatch import detach_state
from rnnlab.models.lm import RNNLM
from rnnlab.training.precision import bf16_note, scoring_bf16, training_bf16
from rnnlab.training.threads import auto_threads

MAX_LOSS = 700.0  # exp(700) is near float64's limit: a mean loss beyond it means divergence
EVAL_CHUNK = 2048  # tokens per forward pass of `perplexity`: bounds memory, not the result
TRAIN_STREAMS = 16  # the training split's perplexity: read as this many streams at once
STREAM_CONTEXT = 256  # tokens each stream but the first reads, unscored, before its own


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
    optimizer: Optimizer
    gen: torch.Generator                 # minibatch order and offsets
    epoch: int = 0                       # epochs completed
    history: list[dict] = field(default_factory=list)
    best_val_ppl: float = math.inf
    best_epoch: int = 0
    lr_scale: float = 1.0                # lr_schedule plateau: the product of its decays so far
    bf16: bool | None = None             # trains under bfloat16 autocast; None: not decided yet
    pruned_at: int | None = None         # a study stopped it after this epoch (rnnlab tune)

    @property
    def precision(self) -> str:
        """What the steps ran in: float32 | bfloat16 (train.bf16, decided on the first minibatch)."""
        return "bfloat16" if self.bf16 else "float32"

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
            "lr_scale": self.lr_scale,
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
        self.lr_scale = snap["lr_scale"]


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_line(variant: str, model: RNNLM, device: torch.device, cfg: Train,
                  n_tokens: int) -> str:
    """What trains, where and on how much: the line the train stage prints before its run."""
    c = model.config
    return (f"{variant}: {c.cell} ({c.impl}), {c.num_layers} layer(s) x {c.hidden_size}"
            f"{', tied embedding' if c.tie_weights else ''}, {n_parameters(model):,} parameters, "
            f"on {device}{bf16_note(cfg.bf16, device)}; {n_tokens:,} training tokens")


def epoch_line(r: EpochResult, epochs: int) -> str:
    """One epoch's numbers, as the train stage prints them."""
    return (f"epoch {r.epoch:>3}/{epochs}  train ppl {r.train_ppl:8.3f}  val ppl {r.val_ppl:8.3f}  "
            f"grad {r.grad_norm:6.3f} (clipped {r.clipped_frac:4.0%})  lr {r.lr:.3g}  "
            f"{r.tokens_per_sec:>9,.0f} tok/s  {r.seconds:6.1f}s{'  *best' if r.is_best else ''}")


def train_summary(state: TrainState, cfg: Train, device: torch.device,
                  run_id: str | None) -> dict:
    """train.json, from the epochs trained (state.history, one at least): the best epoch and its
    validation perplexity, the last training perplexity, the mean speed and total time of the
    epochs, the size, device and precision, and the MLflow run (None: tracking off)."""
    h = state.history
    return {
        "best_epoch": state.best_epoch,
        "best_val_ppl": state.best_val_ppl,
        "final_train_ppl": h[-1]["train_ppl"],
        "epochs": cfg.epochs,
        **({"pruned_at": state.pruned_at} if state.pruned_at else {}),  # rnnlab tune stopped it
        "tokens_per_sec": sum(e["tokens_per_sec"] for e in h) / len(h),
        "train_seconds": sum(e["seconds"] for e in h),
        "parameters": n_parameters(state.model),
        "device": str(device),
        "precision": state.precision,  # train.bf16: what the steps ran in
        "mlflow_run_id": run_id,
    }


def prepare_torch(cfg: Train, stage_modules: tuple[str, ...]) -> torch.device:
    """Apply the thread setting and pick the device. `auto` shares the cores among the processes
    of `stage_modules` that run at once (rnnlab/training/threads.py); it is chosen here, once,
    and kept for the whole run."""
    if cfg.threads == "auto":
        threads, why = auto_threads(repo_root(), stage_modules)
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


class PlainOptimizer:
    """train.optimizer (sgd | adam) on CPU parameters: the numbers of torch.optim's SGD and Adam
    with their defaults (its single-tensor path, which it takes on the CPU) to the bit, and the
    same state_dict, so that either loads the other's. Without torch.optim.Optimizer, whose first
    call imports torch._dynamo, seconds of every training process.
    """

    DEFAULTS = {  # torch.optim's param_groups keys and defaults, in its order
        "sgd": {"momentum": 0, "dampening": 0, "weight_decay": 0.0, "nesterov": False,
                "maximize": False, "foreach": None, "differentiable": False, "fused": None},
        "adam": {"betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.0, "amsgrad": False,
                 "maximize": False, "foreach": None, "capturable": False,
                 "differentiable": False, "fused": None, "decoupled_weight_decay": False},
    }

    def __init__(self, kind: str, params, lr: float, weight_decay: float):
        self.kind = kind
        group = {"lr": lr, **self.DEFAULTS[kind], "weight_decay": weight_decay}
        self.param_groups = [{**group, "params": list(params)}]
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        lr, wd = g["lr"], g["weight_decay"]
        for p in g["params"]:
            if p.grad is None:
                continue
            grad = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            if self.kind == "sgd":
                p.add_(grad, alpha=-lr)
                continue
            st = self.state.setdefault(p, {})
            if not st:  # as torch.optim: a float32 step on the CPU (float64 by default dtype)
                wide = torch.get_default_dtype() == torch.float64
                dtype = torch.float64 if wide else torch.float32
                st["step"] = torch.tensor(0.0, dtype=dtype)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            (beta1, beta2), m, v = g["betas"], st["exp_avg"], st["exp_avg_sq"]
            st["step"] += 1
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = st["step"].item()
            denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(g["eps"])
            p.addcdiv_(m, denom, value=-(lr / (1 - beta1**step)))

    def state_dict(self) -> dict:
        """torch.optim's format: state by parameter index, the group with indices for params."""
        params = self.param_groups[0]["params"]
        index = {id(p): i for i, p in enumerate(params)}
        return {"state": {index[id(p)]: dict(s) for p, s in self.state.items()},
                "param_groups": [{**self.param_groups[0], "params": list(range(len(params)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """What `state_dict` (this class's or torch.optim's) holds; tensors of the state moved
        to their parameter's dtype and device as torch.optim moves them (`step` stays)."""
        [saved] = state_dict["param_groups"]
        params = self.param_groups[0]["params"]
        if len(saved["params"]) != len(params):
            raise ValueError("loaded state dict contains a parameter group that doesn't match "
                             "the size of optimizer's group")
        by_id = dict(zip(saved["params"], params))
        self.state = {by_id[i]: {k: (x if k == "step" or not torch.is_tensor(x) else
                                     x.to(dtype=by_id[i].dtype, device=by_id[i].device))
                                 for k, x in s.items()}
                      for i, s in state_dict["state"].items()}
        self.param_groups = [{**copy.deepcopy({k: x for k, x in saved.items() if k != "params"}),
                              "params": params}]


Optimizer = PlainOptimizer | torch.optim.Optimizer


def make_optimizer(model: nn.Module, cfg: Train) -> Optimizer:
    """torch.optim's numbers: PlainOptimizer where every parameter is on the CPU, torch.optim's
    own elsewhere (on a GPU it takes another path, a foreach one)."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        return PlainOptimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def new_state(model: RNNLM, cfg: Train) -> TrainState:
    return TrainState(model, make_optimizer(model, cfg), torch.Generator().manual_seed(cfg.seed))


def lr_at(cfg: Train, progress: float, epoch: int, scale: float = 1.0) -> float:
    """Learning rate after `progress` (0..1) of the whole run, in `epoch` (from 1).

    cosine  decays smoothly to 0 over the run, step by step
    step    lr * lr_decay ** (epochs past lr_decay_after): Zaremba et al.'s "decay 0.5 after 4"
    plateau lr * `scale`, the product of the decays after epochs that did not improve
    """
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_decay ** max(0, epoch - cfg.lr_decay_after)
    if cfg.lr_schedule == "plateau":
        return cfg.lr * scale
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


def train_step(model: RNNLM, x: torch.Tensor, y: torch.Tensor, h, opt: Optimizer,
               clip_theta: float, bf16: bool = False):
    """One minibatch from state h (detached, or None): forward, loss, backward, clip, step.

    Returns (new state, loss, gradient norm before clipping), all tensors: no host sync.
    The benchmark (bench/benchmark.py) times exactly this function.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        total, h = model.loss(x, y, h)  # summed over the batch's tokens
        loss = total / y.numel()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip_theta)  # global L2 norm
    opt.step()
    return h, loss.detach(), norm


def run_epochs(state: TrainState, train_ids: torch.Tensor, val_ids: torch.Tensor, cfg: Train,
               device: torch.device, checked: bool = False) -> Iterator[EpochResult]:
    """Train from `state.epoch + 1` to `cfg.epochs`, yielding each epoch's numbers. A training
    split too short for one minibatch is refused first (check_fits), unless `checked`: the
    caller did that itself (the train stage, before it opens a run or makes a file)."""
    if not checked:
        check_fits(len(train_ids), cfg)
    train_ids, val_ids = train_ids.to(device), val_ids.to(device)
    sampler = SAMPLERS[cfg.sampling]
    per_epoch = num_batches(len(train_ids), cfg.batch_size, cfg.num_steps)
    scoring = scoring_bf16(cfg.bf16)

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        with phases.phase("training"):  # the epoch and its validation; not what the caller does after
            result = _epoch(state, train_ids, val_ids, cfg, device, epoch, sampler, per_epoch, scoring)
        state.epoch = epoch
        state.history.append(asdict(result))
        yield result


def _epoch(state: TrainState, train_ids: torch.Tensor, val_ids: torch.Tensor, cfg: Train,
           device: torch.device, epoch: int, sampler, per_epoch: int, scoring: bool) -> EpochResult:
    """One epoch of `run_epochs`: its minibatches, then the validation score."""
    model, opt = state.model, state.optimizer
    start = time.perf_counter()
    model.train()
    window, norms = [], []  # per-step tensors, looked at every 25 steps: few host syncs
    loss_sum = torch.zeros((), device=device)
    n_tokens, lr, h = 0, cfg.lr, None
    batches = sampler(train_ids, cfg.batch_size, cfg.num_steps, state.gen)
    for step, (x, y) in enumerate(tqdm(batches, total=per_epoch, leave=False, disable=None,
                                       desc=f"epoch {epoch}", unit="batch"), start=1):
        lr = lr_at(cfg, (epoch - 1 + step / per_epoch) / cfg.epochs, epoch, state.lr_scale)
        for group in opt.param_groups:
            group["lr"] = lr
        # sequential: carry the state across minibatches, detached to truncate BPTT;
        # random: rows are unrelated to the previous minibatch's, so start from zeros.
        h = detach_state(h) if (cfg.sampling == "sequential" and h is not None) else None
        if state.bf16 is None:  # decided on the first minibatch, kept for the whole run
            state.bf16 = training_bf16(cfg.bf16, model, x, y, h)
        h, loss, norm = train_step(model, x, y, h, opt, cfg.clip_theta, state.bf16)
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
    val_ppl = perplexity(model, val_ids, device, scoring)
    if not math.isfinite(val_ppl) or train_loss > MAX_LOSS:
        raise UserError(
            f"training diverged: after epoch {epoch} the training loss is {train_loss:.4g} and "
            f"the validation perplexity {val_ppl:.4g}; lower train.lr or train.clip_theta and "
            "run again (nothing of this epoch was saved)"
        )
    is_best = val_ppl < state.best_val_ppl
    if is_best:
        state.best_val_ppl, state.best_epoch = val_ppl, epoch
    elif cfg.lr_schedule == "plateau":  # PyTorch's word_language_model: anneal when stuck
        state.lr_scale *= cfg.lr_decay
    return EpochResult(
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


def split_perplexities(model: RNNLM, splits: dict[str, np.ndarray], device: torch.device,
                       bf16: bool = False) -> dict[str, float]:
    """The perplexity of each split by the protocol of docs/evaluation.md: each held-out split
    read as one sequence (`perplexity`), whatever the training batches; the long training split
    as TRAIN_STREAMS streams, each with context (`streamed_perplexity`)."""
    return {s: (streamed_perplexity if s == "train" else perplexity)(
                model, torch.as_tensor(splits[s]), device, bf16)
            for s in SPLITS}


@torch.no_grad()
def perplexity(model: RNNLM, ids: torch.Tensor, device: torch.device | None = None,
               bf16: bool = False, chunk: int = EVAL_CHUNK) -> float:
    """exp(mean next-token cross-entropy) over `ids`: the held-out protocol (docs/evaluation.md).

    The whole split is read as ONE sequence (batch 1) from a zero state, left to right with the
    state carried, so every token after the first is predicted once, from all the text before it.
    Nothing depends on the training settings (batch size, steps), so every variant is scored on
    the same predictions. `chunk` bounds memory only: the state carried from chunk to chunk
    makes the result the same for any chunk length (up to float rounding).
    """
    n = len(ids) - 1  # predictions: every token after the first
    if n < 1:
        raise ValueError(f"perplexity needs at least 2 tokens (one input, one target), got "
                         f"{len(ids)}")

    def summed_loss(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        total, h = torch.zeros((), dtype=torch.float64, device=device), None
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            x, y = ids[i:j][None], ids[i + 1 : j + 1][None]  # (1, steps): inputs, their next tokens
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, h = model.loss(x, y, h)  # h carried: chunking changes nothing
            total += loss.double()  # bf16 logits are scored in float32, float64 models in float64
        return total

    return _scored(model, ids, device, summed_loss)


@torch.no_grad()
def streamed_perplexity(model: RNNLM, ids: torch.Tensor, device: torch.device | None = None,
                        bf16: bool = False, streams: int = TRAIN_STREAMS,
                        context: int = STREAM_CONTEXT, chunk: int = EVAL_CHUNK) -> float:
    """`perplexity` of a long split read as `streams` contiguous pieces at once (a batch), for
    the training split's number (docs/evaluation.md): each token after the first is still
    predicted once, and each piece but the first starts `context` tokens early, those predictions
    unscored, so that its state has read text before its first scored one. Many streams take
    1/streams of the steps of one, each step costing little more. Splits shorter than `streams`
    pieces of `context` tokens are read as one sequence (`perplexity` itself)."""
    n = len(ids) - 1  # predictions
    per = -(-n // streams)  # scored predictions per stream (the last may have fewer)
    if streams <= 1 or per <= context:
        return perplexity(model, ids, device, bf16, chunk)

    def summed_loss(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        width = context + per  # every stream's inputs, padded at the end
        x = torch.zeros((streams, width), dtype=ids.dtype, device=device)
        y = torch.zeros_like(x)
        scored = torch.zeros((streams, width), dtype=torch.bool, device=device)
        for k in range(streams):
            first, end = k * per, min((k + 1) * per, n)  # scored predictions [first, end)
            begin = max(0, first - context)  # the stream's first input
            if end <= first:
                continue
            x[k, : end - begin] = ids[begin:end]
            y[k, : end - begin] = ids[begin + 1 : end + 1]
            scored[k, first - begin : end - begin] = True
        total, h = torch.zeros((), dtype=torch.float64, device=device), None
        step = max(1, chunk // streams)
        for i in range(0, width, step):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits, h = model(x[:, i : i + step], h)  # h carried: chunking changes nothing
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16: in float32
            losses = F.cross_entropy(logits.flatten(0, 1), y[:, i : i + step].flatten(),
                                     reduction="none")
            total += losses[scored[:, i : i + step].flatten()].double().sum()
        return total

    return _scored(model, ids, device, summed_loss)


def _scored(model: RNNLM, ids: torch.Tensor, device: torch.device | None,
            summed_loss: Callable[[torch.Tensor, torch.device], torch.Tensor]) -> float:
    """What both perplexities share: `model` in eval mode for the call (its mode put back after),
    `ids` on `device` (default: the model's), and exp(summed_loss / predictions), where
    `summed_loss(ids, device)` is the float64 sum of the losses of all len(ids) - 1 predictions;
    inf past MAX_LOSS."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    try:
        total = summed_loss(ids.to(device), device)
    finally:
        model.train(was_training)
    mean = float(total) / (len(ids) - 1)
    return math.exp(mean) if mean <= MAX_LOSS else math.inf
