"""An Optuna trial's view of a training (rnnlab tune, rnnlab/cluster/tune.py): each epoch's
validation perplexity is reported to the trial, and the study's pruner may stop the training.

The trial reaches the training through one environment variable, RNNLAB_TRIAL, which
`rnnlab tune` gives the worker's `dvc exp run`: a JSON object `TrialRef` (the study's storage URL
without a password, its name, the trial's number, the pruner, the variant it tunes), read by
`parse_trial` with a one-line error. The pruner is not stored with the study: each side makes
its own. Without the variable (every other run) `reporter` is None and Optuna, which is in the
`cluster` extra only, is not imported.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable

from rnnlab.errors import UserError

TRIAL_ENV = "RNNLAB_TRIAL"
PRUNERS = ("median", "hyperband", "none")
STORAGES = re.compile(r"(sqlite:///|postgresql(\+\w+)?://|mysql(\+\w+)?://)[^\x00-\x1f\x7f]+")
STUDY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
VARIANT = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class TrialRef:
    """Which trial of which study a training reports to."""

    storage: str   # the study's RDB URL, no password in it (each side has its own login)
    study: str     # the study's name
    number: int    # the trial's number in the study
    pruner: str    # one of PRUNERS
    variant: str   # the variant whose perplexity the study minimises

    def to_env(self) -> dict[str, str]:
        return {TRIAL_ENV: json.dumps(asdict(self), sort_keys=True)}


def parse_trial(text: str) -> TrialRef:
    """The TrialRef in `text` (RNNLAB_TRIAL's value); anything else is a one-line UserError."""
    from rnnlab.redact import credentials_in

    try:
        fields = json.loads(text)
        ref = TrialRef(**fields)
    except (ValueError, TypeError) as err:
        raise UserError(f"{TRIAL_ENV}: not a trial ({type(err).__name__}: {err}); expected JSON "
                        "with storage, study, number, pruner, variant") from None
    problems = [what for what, ok in (
        ("storage: an sqlite:///, postgresql:// or mysql:// URL", isinstance(ref.storage, str)
         and STORAGES.fullmatch(ref.storage) and not credentials_in(ref.storage)),
        ("study: a name", isinstance(ref.study, str) and STUDY.fullmatch(ref.study)),
        ("number: an integer >= 0", isinstance(ref.number, int) and not isinstance(ref.number, bool)
         and ref.number >= 0),
        (f"pruner: one of {', '.join(PRUNERS)}", ref.pruner in PRUNERS),
        ("variant: a variant name", isinstance(ref.variant, str) and VARIANT.fullmatch(ref.variant)),
    ) if not ok]
    if problems:
        raise UserError(f"{TRIAL_ENV}: not a trial: {'; '.join(problems)}")
    return ref


def make_pruner(kind: str):
    """The study's pruner: `median` stops a trial whose perplexity is worse than the median of
    earlier trials at the same epoch (after 2 trials and 1 epoch); `hyperband` Optuna's
    Hyperband over epochs; `none` never stops one."""
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def reporter(variant: str) -> Callable[[int, float], bool] | None:
    """A function (epoch, val_ppl) -> whether to stop now (pruned), for the variant a study
    tunes; None when no trial runs this training."""
    if not os.environ.get(TRIAL_ENV):
        return None
    ref = parse_trial(os.environ[TRIAL_ENV])
    if ref.variant != variant:
        return None
    import optuna

    storage = optuna.storages.RDBStorage(ref.storage)
    study = optuna.load_study(study_name=ref.study, storage=storage, pruner=make_pruner(ref.pruner))
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(ref.study), ref.number)
    trial = optuna.trial.Trial(study, trial_id)

    def report(epoch: int, val_ppl: float) -> bool:
        trial.report(val_ppl, epoch)
        return trial.should_prune()

    return report
