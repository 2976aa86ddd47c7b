"""DVC stage `train@<variant>`: train one variant, keep the checkpoint with the best validation
perplexity, record per-epoch curves (DVC plots + MLflow). Killed part-way, it resumes from the
last completed epoch when run again with the same settings, data and code
(rnnlab/training/resume.py)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from rnnlab.config import load_params, variant_train
from rnnlab.data.corpus import load_tokens
from rnnlab.errors import run_program
from rnnlab.fileio import atomic_path
from rnnlab.models.lm import new_model
from rnnlab.tracking.mlflow_model import input_example
from rnnlab.tracking.records import record_curves, record_curves_png, record_summary, run_params
from rnnlab.tracking.runs import experiment_name, stage_run
from rnnlab.tracking.tags import folder_sha1
from rnnlab.training.loop import (
    check_fits,
    epoch_line,
    n_parameters,
    prepare_torch,
    train_summary,
    training_line,
)
from rnnlab.training.resume import fingerprint, finished, resumed_state, train_epochs
from stages import TORCH_STAGES, TRAIN

CODE_ROOT = Path(__file__).resolve().parents[1]  # stages/ and the rnnlab/ it imports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", required=True, help="a key of params.yaml's variants")
    parser.add_argument("--data", required=True, help="the tokenize stage's output folder")
    parser.add_argument("--out", required=True, help="folder for best.pt and train.json")
    parser.add_argument("--curves", required=True, help="per-epoch CSV (a DVC plots file)")
    parser.add_argument("--work", required=True,
                        help="folder for resumable state (kept across runs)")
    args = parser.parse_args()

    params = load_params(args.params)
    name, work, out = args.variant, Path(args.work), Path(args.out)
    cfg = variant_train(params, name)
    tokens = load_tokens(args.data)
    check_fits(len(tokens.splits["train"]), cfg)  # before any MLflow run or file is made
    device = prepare_torch(cfg, TORCH_STAGES)

    torch.manual_seed(cfg.seed)
    model = new_model(params.variants[name], cfg, len(tokens.vocab)).to(device)
    data_sha1 = folder_sha1(args.data)
    fp = fingerprint(model.config, cfg, data_sha1, TRAIN, CODE_ROOT)
    state, resume = resumed_state(model, cfg, work, fp, name)
    print(training_line(name, model, device, cfg, len(tokens.splits["train"])))

    corpus = experiment_name(tokens.stats)
    with stage_run(params.tracking, name, corpus, data_sha1, args.params,
                   continue_run=resume.run_id) as tracker:
        if not tracker.reopened:
            tracker.log_params(run_params(params, name, model.config, n_parameters(model)))
            tracker.log_dataset(tokens.splits["train"], args.data, f"{corpus}-train", data_sha1,
                                "training")
        if state.history:  # resumed: the curves file DVC removed; the epochs this run lacks
            record_curves(args.curves, state.history, tracker, resumed=True)
        for result in train_epochs(state, tokens, cfg, device, work, fp, resume, tracker, name):
            record_curves(args.curves, state.history, tracker)
            print(epoch_line(result, cfg.epochs), flush=True)

        with atomic_path(out / "best.pt") as tmp:
            shutil.copyfile(work / "best.pt", tmp)
        summary = record_summary(out / "train.json",
                                 train_summary(state, cfg, device, tracker.run_id), tracker)
        record_curves_png(out / "curves.png", state.history, tracker, title=name)
        tracker.log_artifact(out / "best.pt", "checkpoint")
        tracker.log_model(out / "best.pt", example=input_example(tokens))
        tracker.log_artifact(Path(args.data) / "vocab.json", "checkpoint")
        tracker.log_artifact(args.curves, "curves")
    finished(work)
    print(f"{name}: best val ppl {summary['best_val_ppl']} at epoch {summary['best_epoch']} -> "
          f"{out / 'best.pt'}")


if __name__ == "__main__":
    run_program(main)
