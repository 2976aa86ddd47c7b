"""The schema of params.yaml: every setting, its type and its allowed range, in one place.

`load_params` validates the whole file before any stage does work. A mistake (an unknown key, a
wrong type, a value out of range) becomes a UserError with one line per problem, naming the key
path, the value and what is allowed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from rnnlab.corpora import BUILTIN
from rnnlab.errors import UserError

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]


class Section(BaseModel):
    """A params.yaml section: unknown keys and loose types are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Data(Section):
    corpus: str = "timemachine"
    source: str | None = None
    sha1: str | None = None
    max_tokens: Count | None = None

    @field_validator("corpus")
    @classmethod
    def _known_corpus(cls, v: str) -> str:
        if v != "custom" and v not in BUILTIN:
            raise ValueError(f"unknown corpus; allowed: {', '.join([*BUILTIN, 'custom'])}")
        return v

    @field_validator("sha1")
    @classmethod
    def _hex_sha1(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-f]{40}", v):
            raise ValueError("must be 40 lower-case hex digits")
        return v

    @model_validator(mode="after")
    def _custom_needs_source(self) -> Data:
        if self.corpus == "custom" and not self.source:
            raise ValueError(
                "corpus 'custom' needs data.source (a text file, a folder or zip with "
                "train/val/test files, or a URL)"
            )
        return self


class Split(Section):
    train: Fraction = 0.9
    val: Fraction = 0.05
    test: Fraction = 0.05

    @model_validator(mode="after")
    def _sums_to_one(self) -> Split:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class Tokenize(Section):
    token: Literal["char", "word"] = "char"
    normalize: Literal["auto", "book", "lower", "plain"] = "auto"
    join_lines: Literal["space", "none", "newline"] = "space"
    min_freq: Count = 1
    split: Split = Split()


class Train(Section):
    lr: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = 1.0
    clip_theta: Positive = 1.0
    num_steps: Count = 35
    hidden_size: Count = 256
    batch_size: Count = 32
    epochs: Count = 10
    optimizer: Literal["sgd", "adam"] = "sgd"
    sampling: Literal["sequential", "random"] = "sequential"
    seed: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    bf16: bool = False
    threads: Annotated[int, Field(ge=0)] = 2


class TrainOverrides(Train):
    """A variant's `train`: any train key but hidden_size, with the same types and ranges. Only the
    keys given are validated and applied (`model_fields_set`); the rest come from `train`."""

    NOT_ALLOWED: ClassVar[tuple[str, ...]] = ("hidden_size",)

    @field_validator("hidden_size")
    @classmethod
    def _own_hidden_size(cls, v: int) -> int:
        raise ValueError("set the variant's own hidden_size, not train.hidden_size")


TRAIN_KEYS = tuple(Train.model_fields)


class Variant(Section):
    cell: Literal["rnn", "gru", "lstm"]
    impl: Literal["scratch", "torch"] = "torch"
    num_layers: Count = 1
    hidden_size: Count | None = None
    embed_size: Annotated[int, Field(ge=0)] = 0
    bidirectional: bool = False
    train: TrainOverrides = TrainOverrides()

    @field_validator("bidirectional")
    @classmethod
    def _not_bidirectional(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "a bidirectional RNN reads the tokens after the one it predicts, so it cannot be a "
                "next-token language model; allowed: false"
            )
        return v

    def overrides(self) -> dict[str, Any]:
        """The train keys this variant sets itself."""
        return self.train.model_dump(include=self.train.model_fields_set)


def _has_text(prefix: str) -> str:
    if not prefix.strip():
        raise ValueError("a prefix needs at least one character besides spaces "
                         "(it is what the model warms up on)")
    return prefix


class Evaluate(Section):
    prefixes: list[Annotated[str, AfterValidator(_has_text)]] = ["time traveller", "the time machine"]
    num_tokens: Count = 50
    temperature: Positive = 0.8
    num_samples: Annotated[int, Field(ge=0)] = 2
    seed: Annotated[int, Field(ge=0)] = 0


class Tracking(Section):
    enabled: bool = True
    experiment: str | None = None


def _stage_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError("use only letters, digits, _ . and - "
                         "(it names the stages train@<name>, evaluate@<name>)")
    return name


VariantName = Annotated[str, AfterValidator(_stage_name)]


class Params(Section):
    data: Data = Data()
    tokenize: Tokenize = Tokenize()
    train: Train = Train()
    variants: Annotated[dict[VariantName, Variant], Field(min_length=1)]
    evaluate: Evaluate = Evaluate()
    tracking: Tracking = Tracking()

    @model_validator(mode="after")
    def _overrides_valid(self) -> Params:
        for name in self.variants:
            resolve_train(self, name)  # raises on a bad override value
        return self


def variant_train(params: Params, name: str) -> Train:
    """The training settings of the variant a stage was asked for; an unknown name is a UserError."""
    if name not in params.variants:
        raise UserError(f"--variant {name!r} is not in params.yaml variants: {', '.join(params.variants)}")
    return resolve_train(params, name)


def resolve_train(params: Params, name: str) -> Train:
    """The training settings of one variant: the `train` section with its overrides applied."""
    variant = params.variants[name]
    merged = {**params.train.model_dump(), **variant.overrides()}
    if variant.hidden_size is not None:
        merged["hidden_size"] = variant.hidden_size
    try:
        return Train(**merged)
    except ValidationError as err:
        raise ValueError("; ".join(_lines(err, prefix=f"variants.{name}.train"))) from None


def _lines(err: ValidationError, prefix: str = "") -> list[str]:
    """One readable line per problem: `key.path = value: what is allowed`."""
    lines = []
    for e in err.errors():
        loc = [str(p) if str(p).isprintable() else repr(p) for p in e["loc"]]  # a key with "\n"
        path = ".".join([prefix, *loc] if prefix else loc)
        msg = re.sub(r" or instance of \w+$", "", e["msg"].removeprefix("Value error, "))
        if not loc:
            lines.append(msg)
        elif loc[-1] == "[key]":  # a mapping's key, e.g. a variant name: `variants.x y.[key]`
            lines.append(f"{'.'.join(loc[:-2])}: name {e['input']!r}: {msg}")
        elif e["type"] == "extra_forbidden":
            parent = _model_at(e["loc"][:-1])
            keys = [k for k in (parent.model_fields if parent else ())
                    if k not in getattr(parent, "NOT_ALLOWED", ())]
            allowed = f"; allowed: {', '.join(keys)}" if keys else ""
            lines.append(f"{path}: unknown key{allowed}")
        elif e["type"] == "missing":
            lines.append(f"{path}: missing (required)")
        else:
            lines.append(f"{path} = {e['input']!r}: {msg}")
    return lines


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class at a location in Params, to list its allowed keys."""
    model: type[BaseModel] = Params
    i = 0
    while i < len(loc):
        field = model.model_fields.get(str(loc[i]))
        if field is None:
            return None
        ann = field.annotation
        if ann is not None and getattr(ann, "__origin__", None) is dict:
            ann = ann.__args__[1]  # variants: skip the variant name
            i += 1
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return None
        i += 1
    return model


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise UserError listing every problem."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        # one line per problem, each naming the file: `params.yaml: train.lr = 0: ...`
        raise UserError("\n".join(f"{source}: {line}" for line in _lines(err))) from None


def load_params(path: str | Path = "params.yaml", overlays: list[str | Path] = ()) -> Params:
    """Read and validate params.yaml (optionally with overlay files merged on top)."""
    raw = read_yaml(path)
    for overlay in overlays:
        raw = deep_merge(raw, read_yaml(overlay))
    return validate_params(raw, str(path))


class _Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader reading YAML 1.2 floats: `1e-5` is a number, not the text '1e-5' (YAML
    1.1 wants a dot, `1.0e-5`; `dvc exp run -S train.lr=1e-5` writes `lr: 1e-05`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it: {getattr(err, 'strerror', None) or err}") from None
    try:
        return yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]} ({_where(err)})") from None


def _where(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "position unknown"


def deep_merge(base: Any, over: Any) -> Any:
    """`over` on top of `base`, merging nested mappings key by key."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = deep_merge(base.get(key), value) if key in base else value
        return out
    return over


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted names for nested settings: {'train': {'lr': 1}} -> {'train.lr': 1}."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump()
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def main() -> None:
    import sys

    path = sys.argv[1] if len(sys.argv) > 1 else "params.yaml"
    params = load_params(path)
    print(f"{path}: valid ({len(params.variants)} variants: {', '.join(params.variants)})")


if __name__ == "__main__":
    from rnnlab.errors import run_main

    run_main(main)
