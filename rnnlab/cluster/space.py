"""A search space on the command line, for `rnnlab tune`:

    train.lr=loguniform(1e-4,1e-1)     a float, log scale
    train.dropout=uniform(0,0.5)       a float
    variants.lstm.num_layers=int(1,3)  an integer, both ends included
    train.optimizer=choice(sgd,adam)   one of the values (a categorical)

as Optuna distributions by key; `settings` turns a trial's values into -S settings.
"""

from __future__ import annotations

import re

import yaml

from rnnlab.errors import UserError

SPEC = re.compile(r"(?P<key>[A-Za-z_][\w.@-]*)=(?P<kind>loguniform|uniform|int|choice)\((?P<args>.*)\)")
KINDS = "loguniform(a,b), uniform(a,b), int(a,b), choice(x,y,...)"


def parse(specs: list[str]) -> dict:
    """{key: optuna distribution} of `specs`; a malformed one is a UserError naming it."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    space = {}
    for spec in specs:
        m = SPEC.fullmatch(spec.strip())
        if not m:
            raise UserError(f"-P {spec}: expected KEY=KIND(ARGS), KIND one of {KINDS}")
        key, kind = m["key"], m["kind"]
        if key in space:
            raise UserError(f"-P {spec}: {key} is given twice; give each key one -P")
        try:
            args = [_value(a) for a in m["args"].split(",")] if m["args"].strip() else []
            if kind == "choice":
                if not args:
                    raise ValueError("give at least one value")
                space[key] = CategoricalDistribution(args)
                continue
            if len(args) != 2:
                raise ValueError("give two bounds, low and high")
            low, high = args
            if kind == "int":
                if not all(isinstance(a, int) for a in args):
                    raise ValueError("int bounds are integers")
                space[key] = IntDistribution(low, high)
            else:
                space[key] = FloatDistribution(float(low), float(high), log=kind == "loguniform")
        except (ValueError, TypeError) as err:
            raise UserError(f"-P {spec}: {err}") from None
    if not space:
        raise UserError(f"no search space: give -P KEY=KIND(ARGS) ({KINDS}), e.g. "
                        "-P 'train.lr=loguniform(1e-4,1e-1)'")
    return space


def _value(text: str):
    """One argument as YAML reads it (1e-4, 3, sgd, true); not a plain value is a ValueError."""
    try:
        value = yaml.safe_load(text.strip())
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "not a YAML value"
        raise ValueError(f"{text.strip()!r} is not a value ({problem})") from None
    if not (value is None or isinstance(value, (str, int, float, bool))):
        raise ValueError(f"{text.strip()!r} is not a plain value (a number, a word, true/false)")
    return value


def extremes(space: dict) -> list[tuple[str, ...]]:
    """A setting for each end of each range (each value of a choice): to check before a trial."""
    out = []
    for key, dist in space.items():
        values = getattr(dist, "choices", None) or (dist.low, dist.high)
        out += [(setting(key, v),) for v in values]
    return out


def settings(params: dict) -> tuple[str, ...]:
    """A trial's values as -S settings."""
    return tuple(setting(k, v) for k, v in params.items())


def setting(key: str, value) -> str:
    return f"{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}"
