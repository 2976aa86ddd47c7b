"""`rnnlab tune`: an Optuna study whose trials are DVC experiments, run on a Dask cluster by the
sweep's machinery (rnnlab/cluster/sweep.py, worker.py).

    rnnlab tune -P 'train.lr=loguniform(1e-4,1e-1)' --variant lstm --trials 20 --local 2

A trial is the experiment `<study>-<number>` of `evaluate@<variant>` with its values as -S
settings, its objective the variant's best validation perplexity (never the test one); its
training reports each epoch to the trial (rnnlab/training/trial.py) and stops when the pruner
says so, tagged `rnnlab.pruned`. The study lives in an RDB storage (--storage,
RNNLAB_OPTUNA_STORAGE, else `optuna.db` beside the repository for --local); running again
continues it up to --trials finished trials. Its runs carry the study's id (`STUDY_ID`), so two
studies of one name never supersede each other's runs. At the end: the best trial, its `dvc exp
apply` line, and Optuna's plots in `tune/<study>/`, logged to an MLflow run of the study.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rnnlab.cluster import grid, space, sweep
from rnnlab.errors import UserError
from rnnlab.redact import credentials_in, public_uri
from rnnlab.training.trial import TrialRef, make_pruner

STORAGE_ENV = "RNNLAB_OPTUNA_STORAGE"
STUDY_ID = "rnnlab.study_id"  # the study's user attribute: its id, the sweep id of its trials' runs


@dataclass
class Study:
    study: object          # optuna.Study
    storage: str
    variant: str
    plan: sweep.Plan
    distributions: dict
    pruner: str


@dataclass(frozen=True)
class Search:
    """What a study searches, checked before any store or cluster is touched."""

    distributions: dict
    variant: str


@dataclass
class Failures:
    """The failed trials of this run, and when to give up."""

    most: int                 # --max-failures
    in_a_row: int             # --max-consecutive-failures
    lines: list[str] = field(default_factory=list)
    streak: int = 0

    def add(self, line: str) -> None:
        self.lines.append(line)
        self.streak += 1

    def succeeded(self) -> None:
        self.streak = 0

    def exhausted(self) -> bool:
        return len(self.lines) >= self.most or self.streak >= self.in_a_row

    def error(self) -> UserError:
        """One line: how many failed, and the failure they shared: the commonest, told apart
        from others by its words (its trial's experiment name and the numbers left out), as the
        first trial of it said it."""
        said = [re.sub(r"^[\w.-]+: ", "", line, count=1) for line in self.lines]
        kinds = Counter(re.sub(r"\d[\d,._]*", "#", line) for line in said)
        kind, n = kinds.most_common(1)[0]
        shared = next(line for line in said if re.sub(r"\d[\d,._]*", "#", line) == kind)
        why = (f"{self.streak} in a row" if self.streak >= self.in_a_row
               else f"--max-failures {self.most}")
        return UserError(f"tune: stopped after {len(self.lines)} failed trial(s) ({why}); "
                         f"{n} of them: {shared}")


def search(repo: Path, specs: list[str], variant: str | None) -> Search:
    """The space and the variant, checked: one line per mistake."""
    distributions = space.parse(specs)
    try:
        grid.check(repo, space.extremes(distributions))
    except UserError as err:  # said of -S settings: say it of the -P that made them, once
        spec_of = {s.strip().split("=", 1)[0]: s.strip() for s in specs}
        lines = {}
        for line in str(err).splitlines():
            key = line.removeprefix("-S ").split("=", 1)[0]
            rest = line.split(": ", 1)[1] if ": " in line else line
            lines.setdefault(key, f"-P {spec_of.get(key, key)}: {rest}")
        raise UserError("\n".join(lines.values())) from None
    return Search(distributions, pick_variant(repo, variant))


def open_study(repo: Path, what: Search, *, name: str, storage: str | None, pruner: str,
               plan: sweep.Plan, local: bool, seed: int | None = None) -> Study:
    import optuna

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
    if STUDY_ID not in study.user_attrs:
        study.set_user_attr(STUDY_ID, uuid.uuid4().hex[:12])
    plan.sweep = study.user_attrs[STUDY_ID]
    fail_interrupted(study)
    return Study(study, storage, what.variant, plan, what.distributions, pruner)


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
        study.tell(t.number, state=TrialState.FAIL)
    if stale:
        print(f"tune: {len(stale)} trial(s) left running by an interrupted run marked failed: "
              f"{', '.join(str(t.number) for t in stale)}")
    return len(stale)


def finished_trials(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def run(s: Study, client, trials: int, slots: int, failures: Failures) -> list[str]:
    """Ask and tell until the study has `trials` finished trials, `slots` at a time; the names of
    the experiments made. Never more trials at once than could still fail within `failures`;
    when they are exhausted, the UserError that says why (after the running trials end)."""
    from optuna.trial import TrialState

    from rnnlab.cluster import worker

    sweep.require_resources(client, sweep.resources(s.plan))
    client.subscribe_topic(worker.TOPIC, lambda event: None)
    name = s.study.study_name
    running: dict = {}  # future -> (trial, experiment name)
    made: list[str] = []

    def room() -> bool:
        return (len(running) < slots and finished_trials(s.study) + len(running) < trials
                and not failures.exhausted()
                and len(failures.lines) + len(running) < failures.most)

    while (finished_trials(s.study) + len(running) < trials and not failures.exhausted()) or running:
        while room():
            trial = s.study.ask(s.distributions)
            exp = f"{name}-{trial.number}"
            ref = TrialRef(s.storage, name, trial.number, s.pruner, s.variant)
            job = s.plan.job(exp, space.settings(trial.params), (f"evaluate@{s.variant}",), ref.to_env())
            running[sweep.submit(client, s.plan, job)] = (trial, exp)
            print(f"tune: trial {trial.number} ({exp}): {' '.join(job.settings)}", flush=True)
        time.sleep(sweep.POLL_SECONDS)
        for future in [f for f in running if f.done()]:
            trial, exp = running.pop(future)
            if future.status == "cancelled":
                raise ConnectionError("the scheduler cancelled the trials")
            if future.status != "finished":
                s.study.tell(trial, state=TrialState.FAIL)
                failures.add(sweep.failure(exp, future))
                print(f"tune: trial {trial.number} failed: {failures.lines[-1]}", flush=True)
                continue
            failures.succeeded()
            made.append(exp)
            metrics = future.result().metrics[s.variant]
            if metrics.get("pruned_at"):
                s.study.tell(trial, state=TrialState.PRUNED)
                print(f"tune: trial {trial.number} pruned after epoch {metrics['pruned_at']} "
                      f"(val ppl {metrics['val_ppl']})", flush=True)
            else:
                s.study.tell(trial, metrics["val_ppl"])
                print(f"tune: trial {trial.number} done: val ppl {metrics['val_ppl']}", flush=True)
    if failures.exhausted():
        raise failures.error()
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
                              filter_string=f"tags.`rnnlab.dvc_exp` = '{best_exp}' and "
                              f"tags.`rnnlab.sweep` = '{s.plan.sweep}'", max_results=1)
    if not runs:
        return
    run = client.create_run(runs[0].info.experiment_id, run_name=f"study {s.study.study_name}",
                            tags={"rnnlab.study": s.study.study_name, "rnnlab.sweep": s.plan.sweep,
                                  "rnnlab.best_trial": best_exp})
    for key, value in s.study.best_trial.params.items():
        client.log_param(run.info.run_id, f"best.{key}", value)
    client.log_metric(run.info.run_id, "best_val_ppl", s.study.best_value)
    for png in pngs:
        client.log_artifact(run.info.run_id, str(png), "study")
    client.set_terminated(run.info.run_id)
