"""A trained model as an MLflow Model: `mlflow.pyfunc.load_model("runs:/<run id>/model")`.

The model is the checkpoint (`best.pt`: tensors, numbers, strings) beside an MLmodel file that
names this module its loader: nothing is pickled. `predict` takes prefixes (a `prefix` column or
a list of strings) and returns each as read and its continuation; params: sampling's `Options`:

    model.predict(["time traveller"], params={"temperature": 0.8, "seed": 1})

A request beyond its bounds (`CAPS`, from the environment of `mlflow models serve`) is refused in
one line before any generation; a shape met for the first time is not measured (choice.unmeasured).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch

from rnnlab import __version__
from rnnlab.errors import UserError
from rnnlab.kernels import choice
from rnnlab.training.checkpoint import load_checkpoint
from rnnlab.training.sampling import Options, continuation

NAME = "model"            # the model's name in its run: runs:/<run id>/model
CHECKPOINT = "best.pt"    # the checkpoint file inside the model's data folder
_PARAM_TYPES = {int: "long", float: "double", bool | None: "boolean"}  # Options' field types
# A request's bounds: (environment variable, default, what it bounds)
CAPS = {"rows": ("RNNLAB_SERVE_MAX_ROWS", 16, "prefixes per request"),
        "prefix": ("RNNLAB_SERVE_MAX_PREFIX_CHARS", 2000, "characters per prefix"),
        "tokens": ("RNNLAB_SERVE_MAX_TOKENS", 500, "num_tokens")}


def input_example(tokens) -> str:
    """The MLflow Model's input example: the start of the validation text (rnnlab.data.corpus's
    Tokens)."""
    vocab = tokens.vocab
    return vocab.decode(tokens.splits["val"][:16 if vocab.token_type == "char" else 4])


def caps() -> dict[str, int]:
    """The bounds of one request, from the environment (CAPS); a bad value is a UserError."""
    import os

    out = {}
    for key, (env, default, _) in CAPS.items():
        text = os.environ.get(env, "").strip()
        if not text:
            out[key] = default
        elif text.isdigit() and int(text) >= 1:
            out[key] = int(text)
        else:
            raise UserError(f"{env} = {text!r}: an integer >= 1 (default {default})")
    return out


def check_request(prefixes: list[str], opts: Options, bounds: dict[str, int]) -> None:
    """Refuse a request beyond `bounds` (caps()): one line naming the bound and its variable."""
    def over(key: str, value: int) -> str:
        env, _, what = CAPS[key]
        return f"{what}: {value} is over the server's bound {bounds[key]} ({env})"

    if len(prefixes) > bounds["rows"]:
        raise UserError(over("rows", len(prefixes)))
    longest = max((len(p) for p in prefixes), default=0)
    if longest > bounds["prefix"]:
        raise UserError(over("prefix", longest))
    if opts.num_tokens > bounds["tokens"]:
        raise UserError(over("tokens", opts.num_tokens))


class RNNLMPredictor:
    """What `mlflow.pyfunc.load_model` returns the `predict` of (via `_load_pyfunc`)."""

    def __init__(self, checkpoint: str | Path):
        self.model, self.vocab, self.meta = load_checkpoint(checkpoint)
        self.model.eval()
        self.bounds = caps()

    def predict(self, model_input, params: dict | None = None):
        """A table of (prefix as read, continuation). A bad input or param is MLflow's own
        INVALID_PARAMETER_VALUE error with the one-line reason, which a served model
        (`mlflow models serve`) answers as a 400 that says it, not as an "unexpected error"."""
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            prefixes = _prefixes(model_input)
            opts = Options(**{k: v for k, v in (params or {}).items() if v is not None})
            check_request(prefixes, opts, self.bounds)
            gen = torch.Generator().manual_seed(opts.seed)
            # whoever asked for text did not ask for kernel measurements, nor wait for them
            with choice.quiet(), choice.unmeasured():
                rows = [continuation(self.model, self.vocab, p, opts.num_tokens,
                                     opts.temperature or None, gen, opts.top_k,
                                     exclude_unk=opts.exclude_unk) for p in prefixes]
        except UserError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame(rows, columns=["prefix", "continuation"])


def _load_pyfunc(data_path: str) -> RNNLMPredictor:
    """MLflow's entry point for a `loader_module`: `data_path` is the model's data folder."""
    path = Path(data_path)
    return RNNLMPredictor(path / CHECKPOINT if path.is_dir() else path)


def _prefixes(model_input) -> list[str]:
    """Prefixes from a list of strings, a string, or a table (its `prefix` column, else its first)."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "prefix" if "prefix" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column]]
    if isinstance(model_input, (list, tuple)) and all(isinstance(v, str) for v in model_input):
        return list(model_input)
    raise UserError(f"predict takes prefixes: a list of strings or a table with a 'prefix' "
                    f"column, not {type(model_input).__name__}")


def signature():
    """Input: one string column (the prefixes: a list of strings is one); output: `prefix` and
    `continuation`; params: the fields of Options, with their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    types = typing.get_type_hints(Options)
    params = [ParamSpec(f.name, _PARAM_TYPES[types[f.name]], f.default)
              for f in dataclasses.fields(Options)]
    return ModelSignature(inputs=Schema([ColSpec("string")]),
                          outputs=Schema([ColSpec("string", "prefix"), ColSpec("string", "continuation")]),
                          params=ParamSchema(params))


def requirements() -> list[str]:
    """What loading it needs: this package and the versions it was trained with."""
    import mlflow
    import pandas

    return [f"rnnlab=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}", f"pandas=={pandas.__version__}"]


def log_model(checkpoint: str | Path, example: str) -> float:
    """Log `checkpoint` as the active run's MLflow Model `model`, with `example` as its input
    example; returns the seconds it took.

    Two of MLflow's steps are made cheap, as a stage pays for them in training time: it checks
    its input example by predicting, here 1 token (the example's params); and it checks that
    this Python satisfies the requirements, by scanning every installed package's files (2.4 s
    on a 2-core machine), which cannot fail here: they are read from this very Python."""
    start = time.perf_counter()  # imports included: the stage pays for them too
    import pandas as pd

    pyfunc = importlib.import_module("mlflow.pyfunc")  # the module: mlflow.pyfunc is a lazy proxy
    environment = importlib.import_module("mlflow.utils.environment")
    example_input = (pd.DataFrame({"prefix": [example]}), {"num_tokens": 1})
    no_check = lambda reqs: None  # noqa: E731
    quiet = logging.getLogger("mlflow.pyfunc")  # its INFO "Validating input example ..."
    with mock.patch.object(environment, "warn_dependency_requirement_mismatches", no_check), \
            mock.patch.object(pyfunc, "warn_dependency_requirement_mismatches", no_check), \
            quieted(quiet, logging.WARNING):
        pyfunc.log_model(
            name=NAME, loader_module=__name__, data_path=str(checkpoint),
            signature=signature(), input_example=example_input, pip_requirements=requirements(),
        )
    return time.perf_counter() - start


@contextmanager
def quieted(logger: logging.Logger, level: int) -> Iterator[None]:
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
