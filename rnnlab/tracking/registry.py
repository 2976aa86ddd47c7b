"""The Model Registry: a trained model becomes the `champion` of its registered name only when its
validation perplexity beats the champion's on the same data (params.yaml: tracking.register)."""

from __future__ import annotations

import logging

from rnnlab.tracking.mlflow_model import NAME, quieted

ALIAS = "champion"   # the registered version with the best validation perplexity so far
VAL_TAG, DATA_TAG = "rnnlab.val_ppl", "rnnlab.data_sha1"


def register_if_better(name: str, run_id: str, val_ppl: float, data_sha1: str) -> str:
    """Register the model of training run `run_id` as a new version of `name` and move the alias
    `champion` to it, if its validation perplexity beats the champion's; returns what was done.

    Perplexities compare on the same validation text only: a champion trained on other data
    (tag rnnlab.data_sha1) keeps the alias, and the line says why."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # a server away or refusing: the Tracker's business
        return f"registry: training run {run_id} is not in this store; nothing registered"
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    if not any(m.name == NAME for m in models):
        return (f"registry: training run {run_id} has no MLflow Model (trained before models "
                "were logged?); nothing registered")
    try:
        holder = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        holder = None  # no such registered model, or no champion yet
    if holder is not None and holder.run_id == run_id:
        return f"registry: {name}'s {ALIAS} is already version {holder.version}, this model"
    if holder is not None:
        best = float(holder.tags.get(VAL_TAG, "inf"))
        if holder.tags.get(DATA_TAG) != data_sha1:
            return (f"registry: {name}'s {ALIAS} (version {holder.version}) was trained on other "
                    f"data; nothing registered (set tracking.register to a name for this data)")
        if best <= val_ppl:
            return (f"registry: {name}'s {ALIAS} stays version {holder.version} (val ppl {best:g} "
                    f"<= {val_ppl:g}); nothing registered")
    # a retry after an outage between registering and moving the alias: that version, not another
    done = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if done:
        version = done[0]
    else:
        quiet = logging.getLogger("mlflow.tracking._model_registry.fluent")  # "Created version"
        with quieted(quiet, logging.WARNING):
            version = mlflow.register_model(f"runs:/{run_id}/{NAME}", name,
                                            tags={VAL_TAG: str(val_ppl), DATA_TAG: data_sha1})
    client.set_registered_model_alias(name, ALIAS, version.version)
    was = f" (was version {holder.version})" if holder is not None else ""
    return f"registry: {name} version {version.version} (val ppl {val_ppl:g}) is now {ALIAS}{was}"
