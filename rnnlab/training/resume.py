"""Resumable training: a run killed part-way (Ctrl-C, SIGTERM, even SIGKILL) continues after its
last complete epoch, but only if the same settings, data and code made it; otherwise it starts
over and says why. "The code" is every project file the train stage runs, the C++ source of the
compiled time loops included, and the PyTorch version.

The kernel path (which code trained each layer, rnnlab/kernels/choice.py: measured per machine)
is kept with the state too. A run resumed on another CPU, or after a new measurement, may take
another path: it continues, and says so once (`kernel_changes`). The paths compute the same
function; their results differ only in the last float digits (summation order), far below what
a seed or an epoch changes, so starting over would throw work away for nothing.

The train stage's work folder (`--work`, kept across runs until the variant finishes):

    resume.pt   the TrainState snapshot of the last complete epoch, its Fingerprint and the id of
                the MLflow run it was logged to
    best.pt     the best checkpoint so far

`checkpointed_epochs` is the epoch loop as the train stage runs it: each epoch reaches the caller
only after its resumable state is on disk, so what the caller then records (curves, MLflow) is
never ahead of what a resumed run continues from. A kill at any moment loses at most the epoch in
progress; a resumed run logs exactly the epochs its MLflow run lacks (records.record_curves).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from rnnlab import codedeps
from rnnlab.config import Train
from rnnlab.data.vocab import Vocab
from rnnlab.errors import UserError
from rnnlab.kernels import choice
from rnnlab.models.lm import ModelConfig
from rnnlab.training.checkpoint import load_resume, save_checkpoint, save_resume
from rnnlab.training.loop import EpochResult, TrainState, run_epochs

COMPILED = "rnnlab/kernels/csrc"  # and the C++ that rnnlab/kernels/native.py compiles


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


def checkpointed_epochs(state: TrainState, train_ids: torch.Tensor, val_ids: torch.Tensor,
                        cfg: Train, device: torch.device, work: Path, fp: Fingerprint,
                        vocab: Vocab, variant: str, run_id: str | None) -> Iterator[EpochResult]:
    """run_epochs, each epoch yielded only after work/best.pt (when it is the best) and
    work/resume.pt hold it."""
    for result in run_epochs(state, train_ids, val_ids, cfg, device):
        if result.is_best:
            save_checkpoint(work / "best.pt", state.model, vocab, variant=variant,
                            epoch=result.epoch, val_ppl=result.val_ppl)
        save_resume(work / "resume.pt", state.snapshot(), asdict(fp), mlflow_run_id=run_id,
                    kernels=kernel_record())
        yield result


def finished(work: Path) -> None:
    """The run is complete and its outputs written: nothing is left to resume."""
    shutil.rmtree(work, ignore_errors=True)
