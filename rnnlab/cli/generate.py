"""`rnnlab generate MODEL PREFIX...`: text from a trained model, in the shell.

MODEL is, in the order tried:
  - a checkpoint file (`best.pt`), or a folder holding one;
  - a variant of params.yaml: the workspace's model of it (where dvc.yaml's train stage puts it);
  - an MLflow run id (32 hex digits): the run's checkpoint, from the tracking store
    (MLFLOW_TRACKING_URI, else the repository's mlflow.db);
  - a DVC experiment name (`dvc exp show`): its model, from DVC's cache; with several variants,
    `--variant`, else the one with the best validation perplexity.

Each prefix is normalised as the model's corpus was; tokens it never saw are reported and read as
<unk>. Greedy by default; `--temperature` > 0 samples (seeded, optionally among the top k).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from rnnlab.cli.experiments import RUN_ID, experiment_refs, find_run, git_show
from rnnlab.config import read_yaml
from rnnlab.errors import UserError
from rnnlab.fileio import repo_root
from rnnlab.kernels import choice
from rnnlab.training.checkpoint import load_checkpoint
from rnnlab.training.sampling import Options, continuation, prefix_tokens

CHECKPOINT = "best.pt"


def add_parser(sub) -> None:
    defaults = Options()
    p = sub.add_parser("generate", help="sample text from a trained model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint file or folder, variant, MLflow run id, or DVC experiment")
    p.add_argument("prefix", nargs="+", help="text to continue (one continuation per prefix)")
    p.add_argument("-n", "--num-tokens", type=int, default=defaults.num_tokens,
                   help=f"tokens to generate (default {defaults.num_tokens})")
    p.add_argument("-t", "--temperature", type=float, default=defaults.temperature,
                   help="0: greedy (default); > 0: sample with this softmax temperature")
    p.add_argument("-k", "--top-k", type=int, default=defaults.top_k,
                   help="sample among the k likeliest tokens only (default 0: all)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the sampling (default 0)")
    p.add_argument("--exclude-unk", action=argparse.BooleanOptionalAction, default=None,
                   help="never generate <unk> (default: for word tokens only)")
    p.add_argument("--samples", type=int, default=1, help="continuations per prefix (default 1)")
    p.add_argument("--variant", help="which variant of a DVC experiment (default: best validation ppl)")
    p.add_argument("--params", default="params.yaml", help="for the workspace's variants")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    opts = Options(args.num_tokens, args.temperature, args.top_k, args.seed, args.exclude_unk)
    if args.samples < 1:
        raise UserError(f"--samples = {args.samples}: must be an integer >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        path, what = find_checkpoint(args.model, Path(tmp), args.variant, Path(args.params))
        model, vocab, _ = load_checkpoint(path)
    for prefix in args.prefix:  # empty after normalisation: one error before any output
        prefix_tokens(vocab, prefix, warn=False)
    c = model.config
    print(f"model: {what}: {c.cell}/{c.impl} {c.num_layers}x{c.hidden_size}, vocabulary "
          f"{c.vocab_size} {vocab.token_type}s", file=sys.stderr)
    gen = torch.Generator().manual_seed(opts.seed)
    with choice.quiet():  # text was asked for, not how this machine's products measured
        for prefix in args.prefix:
            for _ in range(args.samples):
                read, cont = continuation(model, vocab, prefix, opts.num_tokens,
                                          opts.temperature or None, gen, opts.top_k,
                                          exclude_unk=opts.exclude_unk)
                print(read + cont, flush=True)


def find_checkpoint(spec: str, tmp: Path, variant: str | None = None,
                    params: Path = Path("params.yaml")) -> tuple[Path, str]:
    """(a local checkpoint file, what it is) for MODEL `spec` (see the module docstring)."""
    path = Path(spec)
    if path.is_file():
        return path, str(path)
    if path.is_dir():
        if not (path / CHECKPOINT).is_file():
            raise UserError(f"{path}: a folder without a {CHECKPOINT}; give a checkpoint file")
        return path / CHECKPOINT, str(path / CHECKPOINT)
    variants = _workspace_variants(params)
    if spec in variants:
        found = model_dir(spec) / CHECKPOINT
        if not found.is_file():
            raise UserError(f"variant {spec!r} has no trained model at {found}; run `dvc repro "
                            f"train@{spec}` (or name a run id or DVC experiment)")
        return found, f"{found} (variant {spec} of the workspace)"
    if RUN_ID.fullmatch(spec):
        return _from_run(spec, tmp)
    experiments = experiment_refs()
    if spec in experiments:
        return _from_experiment(spec, experiments[spec], variant, tmp)
    raise UserError(
        f"{spec!r} is not a checkpoint file or folder, a variant of {params} "
        f"({', '.join(variants) or 'none'}), an MLflow run id (32 hex digits), or a DVC "
        f"experiment ({', '.join(sorted(experiments)) or 'none: see dvc exp show'})")


def model_dir(variant: str) -> Path:
    """Where dvc.yaml's train stage writes a variant's model (`models/${key}`)."""
    stage = read_yaml(repo_root() / "dvc.yaml")["stages"]["train"]["do"]
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
    return repo_root() / outs[0].replace("${key}", variant)


def _workspace_variants(params: Path) -> list[str]:
    if not params.is_file():
        return []
    return list((read_yaml(params) or {}).get("variants") or {})


def _from_run(run_id: str, tmp: Path) -> tuple[Path, str]:
    """The checkpoint of an MLflow training run (an evaluation's own run: of its training)."""
    from mlflow.exceptions import MlflowException

    client, run = find_run(run_id)
    run_id = run.data.tags.get("rnnlab.train_run_id", run_id)
    try:
        got = client.download_artifacts(run_id, f"checkpoint/{CHECKPOINT}", str(tmp))
    except (MlflowException, OSError):
        raise UserError(f"MLflow run {run_id} has no model (checkpoint/{CHECKPOINT}): not a "
                        "finished training run of rnnlab") from None
    return Path(got), f"MLflow run {run_id} ({run.info.run_name})"


def _from_experiment(name: str, ref: str, variant: str | None, tmp: Path) -> tuple[Path, str]:
    """A DVC experiment's model of `variant` (default: its best validation perplexity)."""
    import yaml

    variants = list((yaml.safe_load(git_show(ref, "params.yaml") or "") or {}).get("variants") or {})
    if variant is None:
        scores = {}
        for v in variants:
            try:
                scores[v] = json.loads(git_show(ref, f"metrics/variants/{v}.json") or "")["val_ppl"]
            except (KeyError, ValueError):
                continue  # not evaluated in this experiment
        if not scores:
            raise UserError(f"DVC experiment {name!r} has no evaluated variant; give --variant "
                            f"({', '.join(variants)})")
        variant = min(scores, key=scores.get)
    elif variant not in variants:
        raise UserError(f"--variant {variant!r}: DVC experiment {name!r} has variants "
                        f"{', '.join(variants)}")
    rel = model_dir(variant).relative_to(repo_root()) / CHECKPOINT
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        with dvc.api.open(rel.as_posix(), repo=str(repo_root()), rev=ref, mode="rb") as f:
            data = f.read()
    except (DvcException, FileNotFoundError) as err:
        raise UserError(f"DVC experiment {name!r}: {rel} is not in this DVC cache ({err}); fetch "
                        f"it with `dvc exp pull <remote> {name}`") from None
    out = tmp / CHECKPOINT
    out.write_bytes(data)
    return out, f"DVC experiment {name}, variant {variant}"
