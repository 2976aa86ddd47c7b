"""A grid in DVC's own `-S` syntax (`train.lr=0.001,0.002`, `range(1,4)`, `choice(a,b)`; several
-S make a product), expanded by DVC's own parser, checked against the params schema, and named.

An experiment's name is a digest of its base commit and its settings: the same command names the
same experiments, so a second run of it recognises those already pushed and skips them.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from rnnlab.config import load_params
from rnnlab.errors import UserError

PARAMS = "params.yaml"


def expand(settings: list[str]) -> list[tuple[str, ...]]:
    """Every combination of the -S settings, each as the -S values of one experiment, in DVC's
    order (the first setting varies slowest)."""
    from dvc.utils.hydra import get_hydra_sweeps
    from hydra.errors import HydraException

    if not settings:
        return [()]
    keys = [s.split("=", 1)[0].lstrip("+~") for s in settings]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise UserError(f"-S {' '.join(settings)}: {', '.join(twice)} given twice; give each key "
                        "one -S (its values comma-separated)")
    try:
        combos = get_hydra_sweeps({PARAMS: list(settings)})
    except HydraException as err:
        first = str(err).splitlines()[0]
        raise UserError(f"-S {' '.join(settings)}: not DVC's -S syntax ({first}); e.g. "
                        "-S train.lr=0.001,0.002 -S 'train.epochs=range(2,6,2)'") from None
    except Exception as err:  # noqa: BLE001 - DVC's own errors (a glob sweep) are the user's to fix
        raise UserError(f"-S {' '.join(settings)}: {err}") from None
    return [tuple(combo[PARAMS]) for combo in combos]


def check(repo: Path, combos: list[tuple[str, ...]]) -> None:
    """Each combination applied to repo's params.yaml must be valid params: a mistake is one
    line per bad setting before anything runs."""
    from dvc.utils.hydra import apply_overrides

    problems: dict[str, None] = {}  # ordered, without repeats
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PARAMS
        for combo in combos:
            shutil.copyfile(repo / PARAMS, path)
            try:
                for setting in combo:
                    try:
                        apply_overrides(str(path), [setting])
                    except Exception:  # noqa: BLE001 - DVC says only "Invalid `--set-param` value"
                        key = setting.split("=", 1)[0]
                        raise UserError(f"-S {setting}: {key} is not a key of {PARAMS} (-S changes "
                                        "the settings there; `make check-params` lists them)") from None
                load_params(path)
            except UserError as err:
                for line in str(err).splitlines():
                    line = line.replace(f"{path}: ", "")
                    problems[line if line.startswith("-S ") else f"-S {' '.join(combo)}: {line}"] = None
    if problems:
        raise UserError("\n".join(problems))


def name(prefix: str, base: str, combo: tuple[str, ...]) -> str:
    """`<prefix>-<7 hex>`: a digest of the base commit and the settings (order-free)."""
    digest = hashlib.sha1("\n".join([base, *sorted(combo)]).encode()).hexdigest()[:7]
    return f"{prefix}-{digest}"
