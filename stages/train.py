"""DVC stage `train@<variant>`: train one variant, keep the checkpoint with the best validation
perplexity, record per-epoch curves (DVC plots + MLflow). Killed part-way, it resumes from the
last completed epoch when run again with the same settings, data and code (rnnlab/training/resume.py)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from rnnlab.config import load_params, variant_train
from rnnlab.data.corpus import load_tokens
from rnnlab.errors import run_main
from rnnlab.fileio import atomic_path
from rnnlab.kernels import choice
from rnnlab.models.lm import new_model
from rnnlab.tracking.records import (
    record_curves,
    record_curves_png,
    record_summary,
    run_params,
)
from rnnlab.tracking.runs import tracked_run
from rnnlab.tracking.tags import dvc_tags, folder_sha1, git_tags
from rnnlab.training.loop import (
    EpochResult,
    check_fits,
    new_state,
    prepare_torch,
)
from rnnlab.training.precision import bf16_hardware
from rnnlab.training.resume import (
    checkpointed_epochs,
    fingerprint,
    finished,
    kernel_changes,
    load_resumable,
)
from rnnlab.training.trial import reporter
from stages import TORCH_STAGES, TRAIN


def epoch_line(r: EpochResult, epochs: int) -> str:
    return (f"epoch {r.epoch:>3}/{epochs}  train ppl {r.train_ppl:8.3f}  val ppl {r.val_ppl:8.3f}  "
            f"grad {r.grad_norm:6.3f} (clipped {r.clipped_frac:4.0%})  lr {r.lr:.3g}  "
            f"{r.tokens_per_sec:>9,.0f} tok/s  {r.seconds:6.1f}s{'  *best' if r.is_best else ''}")


def kernel_tags() -> dict[str, str]:
    """The code this run trains with, as measured fastest here (rnnlab/kernels/choice.py)."""
    return {"rnnlab.kernels": choice.summary(), "rnnlab.kernel_choices": "\n".join(choice.report()),
            "rnnlab.cpu": choice.machine()}


def say_path_changed(name: str, epoch: int, changed: list[str], tracker) -> None:
    """A resumed run trains on another kernel path than its first epochs (another CPU, a new
    measurement): it goes on, and says so here and in the run's tags (docs/reliability.md)."""
    print(f"{name}: the kernel path changed after epoch {epoch} ({'; '.join(changed)}); "
          "continuing: the paths compute the same function and differ only in the last float "
          "digits", flush=True)
    tracker.set_tags({"rnnlab.kernels_changed": f"after epoch {epoch}: {'; '.join(changed)}"})


def model_example(tokens) -> str:
    """The MLflow Model's input example: the start of the validation text."""
    return tokens.vocab.decode(tokens.splits["val"][:16 if tokens.vocab.token_type == "char" else 4])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", required=True, help="a key of params.yaml's variants")
    parser.add_argument("--data", required=True, help="the tokenize stage's output folder")
    parser.add_argument("--out", required=True, help="folder for best.pt and train.json")
    parser.add_argument("--curves", required=True, help="per-epoch CSV (a DVC plots file)")
    parser.add_argument("--work", required=True, help="folder for resumable state (kept across runs)")
    args = parser.parse_args()

    params = load_params(args.params)
    name, work, out = args.variant, Path(args.work), Path(args.out)
    cfg = variant_train(params, name)
    tokens = load_tokens(args.data)
    check_fits(len(tokens.splits["train"]), cfg)  # before any MLflow run or file is made
    device = prepare_torch(cfg, TORCH_STAGES)

    torch.manual_seed(cfg.seed)
    model = new_model(params.variants[name], cfg, len(tokens.vocab)).to(device)
    state = new_state(model, cfg)
    data_sha1 = folder_sha1(args.data)
    fp = fingerprint(model.config, cfg, data_sha1, TRAIN, code_root=Path(__file__).resolve().parents[1])
    resume = load_resumable(work, fp)
    if resume.snapshot:
        state.restore(resume.snapshot)
        print(f"{name}: resuming after epoch {state.epoch} of {cfg.epochs} from {work / 'resume.pt'}")
    elif resume.why_not:
        print(f"{name}: starting over, not resuming: {resume.why_not}")
    n_params = sum(p.numel() for p in model.parameters())
    bf16 = (" (bfloat16 autocast)" if cfg.bf16 is True else " (bfloat16 autocast if it measures faster)"
            if cfg.bf16 == "auto" and bf16_hardware(device) else "")
    print(f"{name}: {model.config.cell} ({model.config.impl}), {model.config.num_layers} layer(s) x "
          f"{model.config.hidden_size}{', tied embedding' if model.config.tie_weights else ''}, "
          f"{n_params:,} parameters, on {device}{bf16}; "
          f"{len(tokens.splits['train']):,} training tokens")

    corpus = f"{tokens.stats['corpus']}-{tokens.stats['token']}"
    exp = os.environ.get("DVC_EXP_NAME")
    tags = {**git_tags(), **dvc_tags(os.environ.get("DVC_STAGE", f"train@{name}"), args.params),
            "rnnlab.variant": name, "rnnlab.data_sha1": data_sha1,
            "rnnlab.threads": torch.get_num_threads()}
    with tracked_run(params.tracking, corpus, f"{name} [{exp}]" if exp else name, tags,
                     continue_run=resume.run_id) as tracker:
        if not tracker.reopened:
            tracker.log_params(run_params(params, name, model.config, n_params))
            tracker.log_dataset(tokens.splits["train"], args.data, f"{corpus}-train", data_sha1, "training")
        if state.history:  # resumed: the curves file DVC removed; the epochs this run lacks
            record_curves(args.curves, state.history, tracker, resumed=True)
        train_ids, val_ids = (torch.as_tensor(tokens.splits[s]) for s in ("train", "val"))
        resumed_after = state.epoch if resume.snapshot else None
        report, pruned_at = reporter(name), None  # an Optuna trial's (rnnlab tune), or None
        for result in checkpointed_epochs(state, train_ids, val_ids, cfg, device, work, fp,
                                          tokens.vocab, name, tracker.run_id):
            record_curves(args.curves, state.history, tracker)
            tracker.set_tags(kernel_tags())  # what the first epoch chose: the same every epoch
            if result.epoch - 1 == resumed_after and (changed := kernel_changes(resume.kernels)):
                say_path_changed(name, resumed_after, changed, tracker)
            print(epoch_line(result, cfg.epochs), flush=True)
            if report and report(result.epoch, result.val_ppl) and result.epoch < cfg.epochs:
                pruned_at = result.epoch
                print(f"{name}: pruned by the study after epoch {pruned_at} of {cfg.epochs}")
                tracker.set_tags({"rnnlab.pruned": "true", "rnnlab.pruned_at": str(pruned_at)})
                break

        with atomic_path(out / "best.pt") as tmp:
            shutil.copyfile(work / "best.pt", tmp)
        h = state.history
        summary = record_summary(out / "train.json", {
            "best_epoch": state.best_epoch,
            "best_val_ppl": state.best_val_ppl,
            "final_train_ppl": h[-1]["train_ppl"],
            "epochs": cfg.epochs,
            **({"pruned_at": pruned_at} if pruned_at else {}),  # a study stopped it (rnnlab tune)
            "tokens_per_sec": sum(e["tokens_per_sec"] for e in h) / len(h),
            "train_seconds": sum(e["seconds"] for e in h),
            "parameters": n_params,
            "device": str(device),
            "precision": state.precision,  # train.bf16: what the steps ran in
            "mlflow_run_id": tracker.run_id,
        }, tracker)
        record_curves_png(out / "curves.png", h, tracker, title=name)
        tracker.log_artifact(out / "best.pt", "checkpoint")
        tracker.log_model(out / "best.pt", example=model_example(tokens))
        tracker.log_artifact(Path(args.data) / "vocab.json", "checkpoint")
        tracker.log_artifact(args.curves, "curves")
    finished(work)
    print(f"{name}: best val ppl {summary['best_val_ppl']} at epoch {summary['best_epoch']} -> {out / 'best.pt'}")


if __name__ == "__main__":
    run_main(main)
