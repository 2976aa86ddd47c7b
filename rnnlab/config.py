"""The schema of params.yaml: every setting, its type and its allowed range, in one place.

params.yaml is the one place a setting's default is written: the schema gives its keys types and
ranges but no defaults, so a key or section missing from the file is an error naming it, never a
silent fallback to another value. The only defaults here are those of the keys params.yaml leaves
out on purpose: a variant's optional keys (`impl`, `num_layers`, `hidden_size`, `embed_size`,
`bidirectional`, `train` overrides).

`load_params` validates the whole file before any stage does work. A mistake (a missing or unknown
key, a wrong type, a value out of range) becomes a UserError with one line per problem, naming the
key path, the value and what is allowed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)

from rnnlab.corpora import BUILTIN
from rnnlab.errors import UserError
from rnnlab.redact import CREDENTIALS_HOWTO, credentials_in, public_uri

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]


class Section(BaseModel):
    """A params.yaml section: unknown keys and loose types are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Data(Section):
    corpus: str
    source: str | None
    sha1: str | None
    max_tokens: Count | None

    @field_validator("corpus")
    @classmethod
    def _known_corpus(cls, v: str) -> str:
        if v != "custom" and v not in BUILTIN:
            raise ValueError(f"unknown corpus; allowed: {', '.join([*BUILTIN, 'custom'])}")
        return v

    @field_validator("source")
    @classmethod
    def _no_secret(cls, v: str | None) -> str | None:
        """data.source is a stage param: DVC writes it to dvc.lock (committed, pushed), MLflow to
        the run's params, the stage to data/raw/source.json. A secret in it would travel."""
        found = credentials_in(v)
        if found:
            raise ValueError(
                f"carries {' and '.join(found)}, and this value is written to dvc.lock, MLflow "
                f"and data/raw/source.json; remove it from the URL and give it {CREDENTIALS_HOWTO}")
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
    train: Fraction
    val: Fraction
    test: Fraction

    @model_validator(mode="after")
    def _sums_to_one(self) -> Split:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class Tokenize(Section):
    token: Literal["char", "word"]
    normalize: Literal["auto", "book", "lower", "plain"]
    join_lines: Literal["auto", "space", "none", "newline", "eos"]
    min_freq: Count
    split: Split

    @field_validator("join_lines")
    @classmethod
    def _line_ends_of_the_token(cls, v: str, info: ValidationInfo) -> str:
        """A line end the tokens cannot hold is a mistake, not a silent no-op (rnnlab/data/text.py)."""
        token = info.data.get("token")
        if v == "eos" and token == "char":
            raise ValueError("<eos> is a word token; with token: char a line end is a '\\n' "
                             "character: use newline (or space, none)")
        if v == "newline" and token == "word":
            raise ValueError("word tokens split on whitespace, so a line break cannot be one: "
                             "use eos (an <eos> token at every line end) or space")
        return v


def _threads_in_one_line(value: Any, handler: Any) -> Any:
    """One error line for train.threads, instead of the union's one per member."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError("Input should be 'auto' or an integer >= 0 (0 = PyTorch's default)") from None


# "auto": chosen at run time so that parallel workers share the cores | 0: PyTorch's default | N
Threads = Annotated[Literal["auto"] | Annotated[int, Field(ge=0)], WrapValidator(_threads_in_one_line)]


def _bf16_in_one_line(value: Any, handler: Any) -> Any:
    try:
        return handler(value)
    except ValidationError:
        raise ValueError("Input should be auto (where the hardware has bfloat16 products), "
                         "true or false") from None


# auto: measured per model where the device multiplies bfloat16 in hardware (rnnlab/training/precision.py) | bool
Bf16 = Annotated[Literal["auto"] | bool, WrapValidator(_bf16_in_one_line)]


class Train(Section):
    lr: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]
    clip_theta: Positive
    num_steps: Count
    hidden_size: Count
    batch_size: Count
    epochs: Count
    optimizer: Literal["sgd", "adam"]
    sampling: Literal["sequential", "random"]
    seed: Annotated[int, Field(ge=0)]
    device: Literal["auto", "cpu", "cuda"]
    dropout: Annotated[float, Field(ge=0, lt=1)]
    lr_schedule: Literal["constant", "cosine", "step", "plateau"]
    lr_decay: Fraction | None
    lr_decay_after: Count | None
    init_scale: Positive | None
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    bf16: Bf16
    threads: Threads

    @field_validator("lr_decay")
    @classmethod
    def _decay_for_its_schedules(cls, v: float | None, info: ValidationInfo) -> float | None:
        schedule = info.data.get("lr_schedule")
        if schedule is None:  # lr_schedule itself is wrong: that is the error to read
            return v
        if v is None and schedule in ("step", "plateau"):
            raise ValueError(f"lr_schedule {schedule} multiplies the rate by lr_decay: "
                             "set it, in (0, 1)")
        if v is not None and schedule in ("constant", "cosine"):
            raise ValueError(f"only lr_schedule step or plateau decays by it, not {schedule}; "
                             "set it to null")
        return v

    @field_validator("lr_decay_after")
    @classmethod
    def _decay_epoch_in_the_run(cls, v: int | None, info: ValidationInfo) -> int | None:
        schedule, epochs = info.data.get("lr_schedule"), info.data.get("epochs")
        if schedule is None:
            return v
        if v is None and schedule == "step":
            raise ValueError("lr_schedule step decays after this epoch: set it (>= 1)")
        if v is not None and schedule != "step":
            raise ValueError(f"only lr_schedule step uses it, not {schedule}; set it to null")
        if v is not None and epochs is not None and v >= epochs:
            allowed = f"1 to {epochs - 1}" if epochs > 1 else "none: step needs epochs >= 2"
            raise ValueError(f"past the last epoch (epochs = {epochs}): the rate would never "
                             f"decay; allowed: {allowed}")
        return v


def _every_key_optional(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s fields with the same types and ranges, each with default None (= not given)."""
    return {name: (Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation, None)
            for name, f in model.model_fields.items()}


class TrainOverrides(create_model("TrainKeys", __base__=Section, **_every_key_optional(Train))):
    """A variant's `train`: any train key but hidden_size, with Train's types and ranges (derived
    from Train, so they cannot drift apart). Every key is optional; only the keys given are
    validated and applied (`model_fields_set`); the rest come from `train`."""

    NOT_ALLOWED: ClassVar[tuple[str, ...]] = ("hidden_size",)

    @field_validator("hidden_size")
    @classmethod
    def _own_hidden_size(cls, v: int) -> int:
        raise ValueError("set the variant's own hidden_size, not train.hidden_size")


class Variant(Section):
    cell: Literal["rnn", "gru", "lstm"]
    impl: Literal["scratch", "torch"] = "torch"
    num_layers: Count = 1
    hidden_size: Count | None = None
    embed_size: Annotated[int, Field(ge=0)] = 0
    tie_weights: bool = False
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
    prefixes: list[Annotated[str, AfterValidator(_has_text)]]
    num_tokens: Count
    temperature: Positive
    num_samples: Annotated[int, Field(ge=0)]
    seed: Annotated[int, Field(ge=0)]
    exclude_unk: Literal["auto", True, False]  # one Literal: one error line, not one per member


def _name(pattern: str, allowed: str) -> AfterValidator:
    """A validator of names: a name must match `pattern` in full, else `allowed` is its error."""

    def check(name: str) -> str:
        if not re.fullmatch(pattern, name):
            raise ValueError(allowed)
        return name

    return AfterValidator(check)


ModelName = Annotated[str, _name(r"[A-Za-z0-9][A-Za-z0-9_.-]*",
                                 "a registered model name: letters, digits, _ . and -, starting "
                                 "with a letter or digit")]


class Tracking(Section):
    enabled: bool
    experiment: str | None
    patience: Annotated[float, Field(ge=0)]
    registry: ModelName | None = Field(alias="register")  # `register` is a method of the class


VariantName = Annotated[str, _name(r"[A-Za-z0-9_.-]+",
                                   "use only letters, digits, _ . and - "
                                   "(it names the stages train@<name>, evaluate@<name>)")]


class Params(Section):
    data: Data
    tokenize: Tokenize
    train: Train
    variants: Annotated[dict[VariantName, Variant], Field(min_length=1)]
    evaluate: Evaluate
    tracking: Tracking

    @model_validator(mode="after")
    def _overrides_valid(self) -> Params:
        for name, variant in self.variants.items():
            train = resolve_train(self, name)  # raises on a bad override value
            if variant.tie_weights and variant.embed_size != train.hidden_size:
                raise ValueError(
                    f"variants.{name}.tie_weights = true: the output layer (vocabulary x "
                    f"hidden_size {train.hidden_size}) can share the embedding's weight only when "
                    f"embed_size is the same, not {variant.embed_size}; set "
                    f"variants.{name}.embed_size: {train.hidden_size}"
                )
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
            lines.append(f"{prefix}: {msg}" if prefix else msg)
        elif e["type"] == "extra_forbidden":  # first: a key may itself be named "[key]"
            parent = _model_at(e["loc"][:-1])
            keys = [k for k in (parent.model_fields if parent else ())
                    if k not in getattr(parent, "NOT_ALLOWED", ())]
            allowed = f"; allowed: {', '.join(keys)}" if keys else ""
            lines.append(f"{path}: unknown key{allowed}")
        elif loc[-1] == "[key]":  # a mapping's key, e.g. a variant name: `variants.x y.[key]`
            lines.append(f"{'.'.join(loc[:-2])}: name {e['input']!r}: {msg}")
        elif e["type"] == "missing":
            lines.append(f"{path}: missing (required)")
        else:
            lines.append(f"{path} = {_shown(e['input'])!r}: {msg}")
    return lines


def _shown(value: object) -> object:
    """A value as an error may quote it: a URI with its secrets masked."""
    return public_uri(value) if isinstance(value, str) else value


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


def parse_yaml(text: str) -> Any:
    """YAML text read as params.yaml is (YAML 1.2 floats: `1e-5` is a number); None for an empty
    text. Invalid YAML raises yaml.YAMLError, for the caller to name its source."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> Any:
    """The YAML file `path` as `parse_yaml` reads it ({} for an empty file); a UserError if it is missing,
    unreadable or not valid YAML (naming the line and column)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it: {getattr(err, 'strerror', None) or err}") from None
    try:
        return parse_yaml(text) or {}
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
