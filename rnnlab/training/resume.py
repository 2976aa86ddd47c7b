"""Resumable training: a run killed part-way (Ctrl-C, SIGTERM, even SIGKILL) continues after its
last complete epoch, but only if the same settings, data and code made it (`Fingerprint`);
otherwise it starts over and says why. The train stage's work folder (`--work`, kept until the
variant finishes) holds resume.pt (the TrainState of the last complete epoch, its fingerprint,
its kernel paths and MLflow run) and best.pt (the best checkpoint so far).

`train_epochs` is the epoch loop as the train stage runs it: each epoch reaches the caller only
after its resumable state is on disk, so what the caller records is never ahead of what a resumed
run continues from. A resumed run on another kernel path (another CPU, a new measurement) goes
on and says so: the paths compute the same function, apart from the last float digits.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from rnnlab import codedeps
from rnnlab.config import Train
from rnnlab.data.corpus import Tokens
from rnnlab.errors import UserError
from rnnlab.kernels import choice
from rnnlab.models.lm import RNNLM, ModelConfig
from rnnlab.training.checkpoint import load_resume, save_checkpoint, save_resume
from rnnlab.training.loop import EpochResult, TrainState, new_state, run_epochs
from rnnlab.training.trial import reporter

COMPILED = "rnnlab/kernels/csrc"  # the C++ that kernels/native.py compiles: no import names it


@dataclass(frozen=True)
class Fingerprint:
    """What made a run's epochs: a run resumes only if all four are unchanged."""

    settings: str           # sha1 of the model config and the resolved training settings
    data: str               # sha1 of the tokenized data
    code: dict[str, str]    # sha1 of each project file the train stage runs (rnnlab/codedeps.py),
                            # the C++ of the compiled loops (COMPILED) too
    torch: str              # the PyTorch version

    def changes_from(self, saved: object) -> list[str]:
        """What differs from a saved fingerprint (`asdict` of one), in words; [] when equal."""
        if not isinstance(saved, dict) or set(saved) != set(asdict(self)):
            return ["the resumable state was saved by an older version of rnnlab"]
        changes = [f"the {k}" for k in ("settings", "data") if saved[k] != getattr(self, k)]
        code = sorted(f for f in {*saved["code"], *self.code} if saved["code"].get(f) != self.code.get(f))
        if code:
            changes.append(f"the code ({', '.join(code)})")
        if saved["torch"] != self.torch:
            changes.append(f"PyTorch ({saved['torch']} -> {self.torch})")
        return changes


def fingerprint(model: ModelConfig, cfg: Train, data_sha1: str, stage: str,
                code_root: Path) -> Fingerprint:
    """What makes this run's epochs. The code: the module `stage` (the train stage's, which hands
    its name down) and the project files it imports, under `code_root` (the folder that holds
    the stage's package; the working directory may be elsewhere)."""
    settings = json.dumps([asdict(model), cfg.model_dump()], sort_keys=True)
    return Fingerprint(settings=hashlib.sha1(settings.encode()).hexdigest(), data=data_sha1,
                       code={**codedeps.digest(stage, code_root), **compiled_digest(code_root)},
                       torch=str(torch.__version__))  # a TorchVersion would not load back


def compiled_digest(code_root: Path) -> dict[str, str]:
    """{relative path: sha1} of the C++ sources under COMPILED: no import names them."""
    return {p.relative_to(code_root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted((code_root / COMPILED).glob("*")) if p.is_file()}


def kernel_record() -> dict:
    """Which path trained the epochs so far, and where: saved with each epoch's state."""
    return {"paths": choice.chosen(), "machine": choice.machine()}


def kernel_changes(saved: dict | None) -> list[str]:
    """How this process's kernel paths differ from the saved ones, in words; [] when the same
    (or when nothing was saved: a state from before the paths were kept)."""
    if not saved:
        return []
    now = choice.chosen()
    return [f"{key}: {was} -> {now[key]}" for key, was in saved.get("paths", {}).items()
            if key in now and now[key] != was]


@dataclass(frozen=True)
class Resumable:
    """What `load_resumable` found: a snapshot to continue from, or why there is none."""

    snapshot: dict | None = None   # TrainState.snapshot() of the last complete epoch
    run_id: str | None = None      # the MLflow run those epochs were logged to
    kernels: dict | None = None    # kernel_record() of those epochs
    why_not: str | None = None     # why a saved state is not used (None: there was none)


def load_resumable(work: Path, fp: Fingerprint) -> Resumable:
    """The saved state in `work` if the same settings, data and code made it."""
    try:
        payload = load_resume(work / "resume.pt")
    except UserError as err:  # damaged: start over rather than fail (it is only a cache)
        return Resumable(why_not=str(err))
    if payload is None:
        return Resumable()
    changes = fp.changes_from(payload.get("fingerprint"))
    if changes:
        return Resumable(why_not=f"{' and '.join(changes)} changed since {work / 'resume.pt'} was saved")
    return Resumable(snapshot=payload, run_id=payload.get("mlflow_run_id"),
                     kernels=payload.get("kernels"))


def resumed_state(model: RNNLM, cfg: Train, work: Path, fp: Fingerprint,
                  variant: str) -> tuple[TrainState, Resumable]:
    """A new TrainState of `model`, restored from work/resume.pt if `fp` made it; prints which."""
    state = new_state(model, cfg)
    resume = load_resumable(work, fp)
    if resume.snapshot:
        state.restore(resume.snapshot)
        print(f"{variant}: resuming after epoch {state.epoch} of {cfg.epochs} from "
              f"{work / 'resume.pt'}")
    elif resume.why_not:
        print(f"{variant}: starting over, not resuming: {resume.why_not}")
    return state, resume


class Run(Protocol):
    """The MLflow run that `train_epochs` tags (rnnlab/tracking/tracker.py's Tracker)."""

    run_id: str | None

    def set_tags(self, tags: dict[str, Any]) -> None: ...


def train_epochs(state: TrainState, tokens: Tokens, cfg: Train, device: torch.device, work: Path,
                 fp: Fingerprint, resume: Resumable, run: Run,
                 variant: str) -> Iterator[EpochResult]:
    """The train stage's epochs, the split already checked (loop.check_fits). Each is yielded
    once work/best.pt (if it is the best) and work/resume.pt hold it, and `run` has the kernel
    choices as tags (`kernel_tags`, set again only if they change). After the first epoch of a
    resumed run, a kernel path other than the saved one is said (printed and tagged). An Optuna
    trial (rnnlab tune) hears every epoch's validation perplexity; if it prunes the training
    before its last epoch, that is said, and the epochs stop there (state.pruned_at)."""
    train_ids, val_ids = (torch.as_tensor(tokens.splits[s]) for s in ("train", "val"))
    report = reporter(variant)  # an Optuna trial's, or None
    first, kernels = True, None
    for result in run_epochs(state, train_ids, val_ids, cfg, device, checked=True):
        if result.is_best:
            save_checkpoint(work / "best.pt", state.model, tokens.vocab, variant=variant,
                            epoch=result.epoch, val_ppl=result.val_ppl)
        save_resume(work / "resume.pt", state.snapshot(), asdict(fp), mlflow_run_id=run.run_id,
                    kernels=kernel_record())
        if kernel_tags() != kernels:
            kernels = kernel_tags()
            run.set_tags(kernels)
        if first and resume.snapshot and (changed := "; ".join(kernel_changes(resume.kernels))):
            print(f"{variant}: the kernel path changed after epoch {result.epoch - 1} ({changed}); "
                  "continuing: the paths compute the same function and differ only in the last "
                  "float digits", flush=True)
            run.set_tags({"rnnlab.kernels_changed": f"after epoch {result.epoch - 1}: {changed}"})
        first = False
        yield result
        if report and report(result.epoch, result.val_ppl) and result.epoch < cfg.epochs:
            state.pruned_at = result.epoch
            print(f"{variant}: pruned by the study after epoch {result.epoch} of {cfg.epochs}")
            run.set_tags({"rnnlab.pruned": "true", "rnnlab.pruned_at": str(result.epoch)})
            return


def kernel_tags() -> dict[str, str]:
    """The kernel choices this process made so far (rnnlab/kernels/choice.py), as a run's tags."""
    return {"rnnlab.kernels": choice.summary(), "rnnlab.kernel_choices": "\n".join(choice.report()),
            "rnnlab.cpu": choice.machine()}


def finished(work: Path) -> None:
    """The run is complete and its outputs written: nothing is left to resume."""
    shutil.rmtree(work, ignore_errors=True)
