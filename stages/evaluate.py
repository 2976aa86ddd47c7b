"""DVC stage `evaluate@<variant>`: perplexity of the best checkpoint on every split, beside a
uniform model's (= vocabulary size), and text samples after each prefix in params.yaml."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rnnlab.config import flatten, load_params, variant_train
from rnnlab.data.corpus import SPLITS, load_tokens
from rnnlab import phases
from rnnlab.errors import UserError, run_program
from rnnlab.fileio import read_json, write_text
from rnnlab.models.lm import ModelConfig, model_config
from rnnlab.tracking.records import record_summary, run_params
from rnnlab.tracking.runs import experiment_name, stage_run
from rnnlab.tracking.tags import folder_sha1
from rnnlab.training.checkpoint import load_checkpoint
from rnnlab.training.loop import prepare_torch, split_perplexities
from rnnlab.training.precision import scoring_bf16
from rnnlab.training.sampling import prefix_samples, prefix_tokens
from stages import TORCH_STAGES


def samples_markdown(name: str, samples: dict[str, dict], temperature: float, seed: int) -> str:
    """One line per sample; a line break in a sample (`<eos>`, or a "\n" character) shows as ⏎."""
    def shown(text: str) -> str:
        return text.replace("\n", " ⏎ ")

    lines = [f"# Samples: {name}", ""]
    for prefix, s in samples.items():
        lines += [f"## `{prefix}`", "", f"- greedy: `{shown(s['greedy'])}`"]
        lines += [f"- sample {i} (temperature {temperature}, seed {seed}): `{shown(t)}`"
                  for i, t in enumerate(s["sampled"], start=1)]
        lines.append("")
    return "\n".join(lines)


def describe(c: ModelConfig) -> str:
    return (f"{c.cell}/{c.impl} {c.num_layers}x{c.hidden_size}, embed {c.embed_size}, dropout "
            f"{c.dropout:g}, vocabulary {c.vocab_size}")


def check_variant(path: Path, name: str, saved_name: str | None, saved: ModelConfig,
                  expected: ModelConfig) -> None:
    """A checkpoint of another variant, or of other settings than params.yaml's, is not this
    one's."""
    if saved_name not in (None, name) or saved != expected:
        raise UserError(
            f"{path}: holds variant {saved_name!r} ({describe(saved)}), but params.yaml's variant "
            f"{name!r} is {describe(expected)}; train it again (dvc repro train@{name})"
        )


def read_train_summary(path: Path, name: str) -> dict:
    """The train stage's train.json, with the numbers evaluate copies from it."""
    try:
        trained = read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run train@{name} first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); run train@{name} again") from None
    keys = ("final_train_ppl", "tokens_per_sec", "epochs", "best_epoch", "train_seconds",
            "parameters")
    missing = [k for k in keys if not isinstance(trained, dict) or k not in trained]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)}; run train@{name} again")
    return trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--data", required=True, help="the tokenize stage's output folder")
    parser.add_argument("--model", required=True, help="the train stage's output folder")
    parser.add_argument("--metrics", required=True, help="metrics JSON to write")
    parser.add_argument("--samples", required=True, help="samples Markdown to write")
    args = parser.parse_args()

    params = load_params(args.params)
    name = args.variant
    cfg, ev = variant_train(params, name), params.evaluate
    device = prepare_torch(cfg, TORCH_STAGES)
    tokens = load_tokens(args.data)
    model, vocab, meta = load_checkpoint(Path(args.model) / "best.pt", tokens.vocab, device)
    check_variant(Path(args.model) / "best.pt", name, meta.get("variant"), model.config,
                  model_config(params.variants[name], cfg, len(vocab)))
    trained = read_train_summary(Path(args.model) / "train.json", name)
    for prefix in ev.prefixes:  # empty after the corpus's normalisation: stop before any work
        prefix_tokens(vocab, prefix, warn=False)

    start = time.perf_counter()
    with phases.phase("evaluation"):
        ppl = split_perplexities(model, tokens.splits, device, scoring_bf16(cfg.bf16))
        samples = prefix_samples(model, vocab, ev)
    metrics = {
        "train_ppl": ppl["train"], "val_ppl": ppl["val"], "test_ppl": ppl["test"],
        "uniform_ppl": len(vocab),
        **{f"{s}_tokens": len(tokens.splits[s]) - 1 for s in SPLITS},  # predictions scored
        "final_train_ppl": trained["final_train_ppl"],
        "tokens_per_sec": trained["tokens_per_sec"],
        "epochs": trained["epochs"], "best_epoch": trained["best_epoch"],
        "train_seconds": trained["train_seconds"], "parameters": trained["parameters"],
        "eval_seconds": time.perf_counter() - start,
    }
    train_run, data_sha1 = trained.get("mlflow_run_id"), folder_sha1(args.data)
    with stage_run(params.tracking, name, experiment_name(tokens.stats), data_sha1, args.params,
                   continue_run=train_run, evaluation=True) as tracker:
        if not tracker.reopened:  # not this experiment's training (DVC restored it), or evaluated
            tracker.log_params(run_params(params, name, model.config, trained["parameters"]))
        tracker.log_params(flatten({"evaluate": ev}))
        metrics = record_summary(args.metrics, metrics, tracker)
        write_text(args.samples, samples_markdown(name, samples, ev.temperature, ev.seed))
        tracker.log_artifact(args.samples, "samples")
        if params.tracking.registry and train_run:
            tracker.register(params.tracking.registry, train_run, metrics["val_ppl"], data_sha1)
    print(f"{name}: train ppl {metrics['train_ppl']}  val {metrics['val_ppl']}  "
          f"test {metrics['test_ppl']}  (uniform {metrics['uniform_ppl']}); "
          f"best epoch {metrics['best_epoch']}/{metrics['epochs']}")
    for prefix, s in samples.items():
        print(f"  {s['greedy']!r}")


if __name__ == "__main__":
    run_program(main)
