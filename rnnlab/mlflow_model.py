"""The loader of MLflow Models logged before rnnlab's modules moved into packages: their MLmodel
names `loader_module: rnnlab.mlflow_model`. Models logged since name rnnlab.tracking.mlflow_model,
which this hands on to; nothing else imports this module."""

from rnnlab.tracking.mlflow_model import _load_pyfunc

__all__ = ["_load_pyfunc"]
