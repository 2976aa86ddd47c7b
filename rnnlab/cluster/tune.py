"""`rnnlab tune`: an Optuna study whose trials are DVC experiments, run on a Dask cluster by the
sweep's machinery (rnnlab/cluster/sweep.py, worker.py).

    rnnlab tune -P 'train.lr=loguniform(1e-4,1e-1)' -P 'train.dropout=uniform(0,0.5)' \
        --variant lstm --trials 20 --pruner median --local 2

Each trial is the experiment `<study>-<number>` of `evaluate@<variant>` with the trial's values as
-S settings. Its objective is the variant's best validation perplexity (never the test one).
Its training reports each epoch's validation perplexity to the trial (rnnlab/training/trial.py)
and stops when the pruner says so; the experiment still ends, with the metrics of the epoch it
reached, and its MLflow run is tagged `rnnlab.pruned`.

The study lives in an RDB storage: --storage or RNNLAB_OPTUNA_STORAGE (the team's PostgreSQL),
else `optuna.db` beside the repository (--local only). Running the command again continues the
study up to --trials finished trials; trials an interrupted run left RUNNING are marked FAIL.
At the end: the best trial, its experiment and the `dvc exp apply` line; Optuna's history and
importance plots as PNGs in `tune/<study>/`, logged to an MLflow run of the study.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from rnnlab.cluster import grid, space, sweep
from rnnlab.errors import UserError
from rnnlab.redact import credentials_in, public_uri
from rnnlab.training.trial import TRIAL_ENV, VARIANT_ENV, make_pruner

STORAGE_ENV = "RNNLAB_OPTUNA_STORAGE"


@dataclass
class Study:
    study: object          # optuna.Study
    storage: str
    variant: str
    plan: sweep.Plan
    distributions: dict
    pruner: str


def open_study(repo: Path, specs: list[str], *, name: str, storage: str | None, variant: str | None,
               pruner: str, plan: sweep.Plan, local: bool, seed: int | None = None) -> Study:
    import optuna

    distributions = space.parse(specs)
    grid.check(repo, space.extremes(distributions))
    variant = pick_variant(repo, variant)
    storage = storage or os.environ.get(STORAGE_ENV) or (
        f"sqlite:///{repo / 'optuna.db'}" if local else None)
    if storage is None:
        raise UserError(f"a study on a cluster lives in a database every worker reaches: set "
                        f"{STORAGE_ENV} (or --storage) to the team's PostgreSQL, e.g. "
                        "postgresql+psycopg://optuna@db-host:5432/optuna (the password from "
                        "PGPASSFILE), or use --local")
    if credentials_in(storage):
        raise UserError(f"--storage {public_uri(storage)}: carries a password, which would travel "
                        "to every worker; give it through PGPASSFILE or PGPASSWORD")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                load_if_exists=True, pruner=make_pruner(pruner))
    # seeded anew on each run, the sampler would suggest the values of the first run again
    study.sampler = optuna.samplers.TPESampler(seed=None if seed is None else seed + len(study.trials))
    fail_interrupted(study)
    return Study(study, storage, variant, plan, distributions, pruner)


def pick_variant(repo: Path, variant: str | None) -> str:
    """The variant whose perplexity the study minimises: --variant, or the only one."""
    from rnnlab.config import load_params

    variants = list(load_params(repo / "params.yaml").variants)
    if variant is None:
        if len(variants) != 1:
            raise UserError(f"--variant: which variant's perplexity to minimise ({', '.join(variants)})")
        return variants[0]
    if variant not in variants:
        raise UserError(f"--variant {variant}: not a variant of params.yaml ({', '.join(variants)})")
    return variant


def fail_interrupted(study) -> int:
    """Trials that an interrupted run left RUNNING will never be told: mark them FAIL."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    if stale:
        print(f"tune: {len(stale)} trial(s) left running by an interrupted run marked failed: "
              f"{', '.join(str(t.number) for t in stale)}")
    return len(stale)


def finished_trials(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def run(s: Study, client, trials: int, slots: int) -> list[str]:
    """Ask and tell until the study has `trials` finished trials, `slots` at a time; the names of
    the experiments made."""
    from optuna.trial import TrialState

    from rnnlab.cluster import worker

    sweep.require_resources(client, sweep.resources(s.plan))
    client.subscribe_topic(worker.TOPIC, lambda event: None)
    name = s.study.study_name
    running: dict = {}  # future -> (trial, experiment name)
    made: list[str] = []
    while finished_trials(s.study) + len(running) < trials or running:
        while running.__len__() < slots and finished_trials(s.study) + len(running) < trials:
            trial = s.study.ask(s.distributions)
            exp = f"{name}-{trial.number}"
            env = {TRIAL_ENV: f"{s.storage} {name} {trial._trial_id} {s.pruner}", VARIANT_ENV: s.variant}
            job = s.plan.job(exp, space.settings(trial.params), (f"evaluate@{s.variant}",), env)
            running[sweep.submit(client, s.plan, job)] = (trial, exp)
            print(f"tune: trial {trial.number} ({exp}): {' '.join(job.settings)}", flush=True)
        time.sleep(sweep.POLL_SECONDS)
        for future in [f for f in running if f.done()]:
            trial, exp = running.pop(future)
            if future.status == "cancelled":
                raise ConnectionError("the scheduler cancelled the trials")
            if future.status != "finished":
                s.study.tell(trial, state=TrialState.FAIL)
                print(f"tune: trial {trial.number} failed: {sweep.failure(exp, future)}", flush=True)
                continue
            made.append(exp)
            metrics = future.result().metrics[s.variant]
            if metrics.get("pruned_at"):
                s.study.tell(trial, state=TrialState.PRUNED)
                print(f"tune: trial {trial.number} pruned after epoch {metrics['pruned_at']} "
                      f"(val ppl {metrics['val_ppl']})", flush=True)
            else:
                s.study.tell(trial, metrics["val_ppl"])
                print(f"tune: trial {trial.number} done: val ppl {metrics['val_ppl']}", flush=True)
    return made


def report(s: Study, repo: Path) -> list[Path]:
    """The best trial in words; the plots saved and logged. -> the PNGs."""
    from optuna.trial import TrialState

    done = [t for t in s.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        print("tune: no trial finished without being pruned: no best trial yet")
        return []
    best = s.study.best_trial
    exp = f"{s.study.study_name}-{best.number}"
    pruned = sum(t.state == TrialState.PRUNED for t in s.study.get_trials(deepcopy=False))
    print(f"tune: {len(done)} trial(s) complete, {pruned} pruned; best: trial {best.number}, "
          f"val ppl {best.value:.4g}, {space.settings(best.params)}")
    print(f"tune: its experiment is {exp}: dvc exp apply {exp}")
    return plots(s, repo / "tune" / s.study.study_name)


def plots(s: Study, folder: Path) -> list[Path]:
    """Optuna's optimization history and parameter importances as PNGs, logged to MLflow."""
    import warnings

    import optuna.visualization.matplotlib as vis

    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, draw in (("history", vis.plot_optimization_history),
                           ("importance", vis.plot_param_importances)):
            try:
                ax = draw(s.study)
            except (ValueError, RuntimeError) as err:  # importance needs 2+ complete trials
                print(f"tune: no {name} plot ({err})")
                continue
            fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=100)
            saved.append(folder / f"{name}.png")
    log_study(s, saved)
    for path in saved:
        print(f"tune: {path}")
    return saved


def log_study(s: Study, pngs: list[Path]) -> None:
    """One MLflow run for the study, beside its trials' runs: the plots, the best values."""
    import mlflow

    client = mlflow.MlflowClient(s.plan.tracking_uri)
    best_exp = f"{s.study.study_name}-{s.study.best_trial.number}"
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`rnnlab.dvc_exp` = '{best_exp}'", max_results=1)
    if not runs:
        return
    run = client.create_run(runs[0].info.experiment_id, run_name=f"study {s.study.study_name}",
                            tags={"rnnlab.study": s.study.study_name, "rnnlab.best_trial": best_exp})
    for key, value in s.study.best_trial.params.items():
        client.log_param(run.info.run_id, f"best.{key}", value)
    client.log_metric(run.info.run_id, "best_val_ppl", s.study.best_value)
    for png in pngs:
        client.log_artifact(run.info.run_id, str(png), "study")
    client.set_terminated(run.info.run_id)
