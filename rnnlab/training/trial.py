"""An Optuna trial's view of a training (rnnlab tune, rnnlab/cluster/tune.py): each epoch's
validation perplexity is reported to the trial, and the study's pruner may stop the training.

The trial is named by the environment, which `rnnlab tune` gives the worker's `dvc exp run`:

    RNNLAB_TRIAL           <study storage URL> <study name> <trial id> <pruner>  (space-separated;
                           the pruner is not stored with the study: each side makes its own)
    RNNLAB_TRIAL_VARIANT   the variant whose perplexity the study minimises

Without them (every other run) `reporter` is None and nothing here is imported: Optuna is in the
`cluster` extra only.
"""

from __future__ import annotations

import os
from typing import Callable

TRIAL_ENV = "RNNLAB_TRIAL"
VARIANT_ENV = "RNNLAB_TRIAL_VARIANT"


PRUNERS = ("median", "hyperband", "none")


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
    spec = os.environ.get(TRIAL_ENV, "").split()
    if len(spec) != 4 or os.environ.get(VARIANT_ENV) != variant:
        return None
    import optuna

    storage, study_name, trial_id, pruner = spec
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=make_pruner(pruner))
    trial = optuna.trial.Trial(study, int(trial_id))

    def report(epoch: int, val_ppl: float) -> bool:
        trial.report(val_ppl, epoch)
        return trial.should_prune()

    return report
