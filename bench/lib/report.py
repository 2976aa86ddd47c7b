"""The benchmark's report: the Markdown of metrics/bench/<cpu-kind>.md, and the row summaries its
JSON keeps."""

from __future__ import annotations

import statistics
from dataclasses import asdict

from bench.lib.book_vs_ours import BOOK
from bench.lib.machine import ISA_FLAGS
from bench.lib.timing import Pair

TABLE_COLUMNS = ("variant", "batch", "code", "tok/s", "min", "max", "ratio", "FLOPs/token",
                 "bound tok/s", "% bound")
SIDES = {"book": None, "ours": "ours", "ours_bf16": "ours bf16"}  # side -> its name in the table


def kilo(x: float) -> str:
    return f"{x / 1e3:,.1f}k"


def _training_rows(pairs: list[dict]) -> list[str]:
    rows = []
    for p in pairs:
        for side, name in SIDES.items():
            if not p.get(side):
                continue
            s, bound = p[side], p["bound_bf16" if side == "ours_bf16" else "bound"]
            ratio = {"book": 1.0, "ours": p["ratio"], "ours_bf16": p.get("ratio_bf16")}[side]
            cells = [p["variant"], p["batch"], name or p["baseline"],
                     kilo(s["median"]), kilo(s["min"]), kilo(s["max"]),
                     f"{ratio:.2f}x", f"{p['flops_per_token']:,}",
                     kilo(bound), f"{s['median'] / bound:.0%}"]
            rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


def markdown(result: dict) -> str:
    """The report: the training table, the matmul rates, and the extras that were measured."""
    m, settings = result["machine"], result["settings"]
    on = "" if m["device"] == "cpu" else f", on {m['device']}"
    lines = [
        f"# Benchmark {result['date']}: {m['cpu']}, {m['threads']} thread(s){on}",
        "",
        f"CPU flags: {' '.join(m.get('flags', [])) or 'none of ' + ', '.join(ISA_FLAGS)}; "
        f"PyTorch's ISA level {m.get('torch_isa', '?')}; oneDNN's ISA: {m.get('onednn_isa', '?')}",
        "",
        f"host {m['host']}, commit {m['commit']}{' (dirty)' if m['dirty'] else ''}, torch "
        f"{m['torch']}, oneDNN {'yes' if m['onednn'] else 'no'}; load average "
        f"{m.get('load_average_before', float('nan')):.1f} before, {m['load_average']:.1f} after "
        f"(other work on the machine; {m['cores']} cores); command: `{result['command']}`",
    ]
    header = ["| " + " | ".join(TABLE_COLUMNS) + " |",
              "|---|---:|---|" + "---:|" * (len(TABLE_COLUMNS) - 3)]
    if result["training"]:
        lines += [
            "",
            f"Training: {settings['steps']} minibatches x {settings['repeats']} repeats per side, "
            f"{BOOK['num_steps']} steps, SGD lr {BOOK['lr']:g}, clip {BOOK['clip_theta']:g}, The "
            f"Time Machine characters (vocab {result['vocab_size']}). tok/s: median (min-max) of "
            "the repeats; ratio: median of the repeats' ours/book; ours bf16: ours under bfloat16 "
            "autocast, timed where train.bf16: auto picks it for the row; bound: every FLOP of "
            "the step (input, recurrent and output products, forward and backward) at the best "
            "rate this machine reached on any product of the row's precision (the table below): "
            "a limit no row can pass.",
            "", *header, *_training_rows(result["training"])]
    if result.get("word"):
        w, (p,) = result["word"]["settings"], result["word"]["training"]
        parts = ", ".join(f"{part} {rows} x {k} @ {k} x {n}"
                          for part, (rows, k, n) in p["shapes"].items())
        lines += [
            "",
            f"Words: {settings['steps']} minibatches x {settings['repeats']} repeats per side of "
            f"Zaremba et al.'s small LSTM ({w['num_layers']} layers of {w['hidden_size']}, "
            f"embedding {w['embed_size']}, vocab {p['config']['vocab_size']:,}, no dropout), batch "
            f"{w['batch']}, {w['num_steps']} steps, SGD lr {w['lr']:g}, clip {w['clip_theta']:g}, "
            f"on {result['word']['data']}; wlm: pytorch/examples word_language_model "
            "(bench/lib/wlm.py). tok/s: median (min-max) of the repeats; ratio: median of the "
            "repeats' ours/wlm; bound: as above, every FLOP at the best rate of the row's "
            f"precision (the parts' products: {parts}).",
            "", *header, *_training_rows(result["word"]["training"])]
    lines += [
        "",
        "float32 matmul rates (GFLOP/s, median of 5 rounds):",
        "",
        "| m x k @ k x n | torch.mm (MKL) | oneDNN | best |",
        "|---|---:|---:|---:|",
    ]
    for r in result["matmul"]:
        lines.append(f"| {r['m']} x {r['k']} @ {r['k']} x {r['n']} | {r['mkl']:.0f} | "
                     f"{r.get('onednn', float('nan')):.0f} | {r['best']:.0f} |")
    if result.get("matmul_bf16"):
        lines += ["", "bfloat16 matmul rates (GFLOP/s, median of 5 rounds):", "",
                  "| m x k @ k x n | torch.mm | oneDNN | best |", "|---|---:|---:|---:|"]
        for r in result["matmul_bf16"]:
            lines.append(f"| {r['m']} x {r['k']} @ {r['k']} x {r['n']} | {r['mkl']:.0f} | "
                         f"{r.get('onednn', float('nan')):.0f} | {r['best']:.0f} |")
        skipped = {r["onednn_skipped"] for r in result["matmul_bf16"] if "onednn_skipped" in r}
        lines += [f"\noneDNN: {reason} (torch.mm emulates bfloat16 here)." for reason in skipped]
    if result.get("kernels"):
        lines += ["", "What ran (rnnlab/kernels/choice.py: measured here at first use, then cached; "
                      "against the reference, times faster):", ""]
        lines += [f"- {line}" for line in result["kernels"]]
    if result.get("inference"):
        lines += ["", "Generation (after `time traveller`), evaluation (`perplexity`, batch 1):",
                  "", "| variant | greedy chars/s | sampled chars/s | eval tok/s |",
                  "|---|---:|---:|---:|"]
        for name, s in result["inference"].items():
            lines.append(f"| {name} | {s['greedy_chars_per_sec']:,.0f} | "
                         f"{s['sampled_chars_per_sec']:,.0f} | {kilo(s['eval_tokens_per_sec'])} |")
    if result.get("dvc"):
        d = result["dvc"]
        warning = "; WARNING: the second run ran a stage" if d["noop_ran_a_stage"] else ""
        lines += ["", f"No-op `dvc repro`: {d['noop_repro_seconds']:.2f} s (the first, running "
                      f"every stage with tiny params: {d['first_repro_seconds']:.1f} s{warning})."]
    if result.get("tracking"):
        t = result["tracking"]
        lines += ["", f"Tracking: record_curves {t['record_curves_seconds_median'] * 1e3:.1f} ms "
                      f"per epoch (median), record_summary {t['record_summary_seconds'] * 1e3:.1f} "
                      f"ms, against {t['epoch_seconds']:.2f} s per epoch "
                      f"({t['batches_per_epoch']} minibatches of {settings['tracking_variant']}): "
                      f"{t['share_of_training']:.2%} of {t['epochs']} epochs' training time "
                      f"({t['share_with_run_start_and_end']:.2%} with the run's start and end, "
                      f"{t['run_start_seconds']:.2f} s and {t['run_end_seconds']:.2f} s)."]
    return "\n".join(lines) + "\n"


def summarize(pair: Pair, bound: float, bound_bf16: float) -> dict:
    """`pair` as the report keeps it: each side's median, min, max, the ratios and the bounds
    (tokens/s at the best float32 rate, and at the best bfloat16 one)."""
    out = {k: v for k, v in asdict(pair).items() if k not in SIDES}
    for side in SIDES:
        values = getattr(pair, side)
        if values:
            out[side] = {"median": statistics.median(values), "min": min(values),
                         "max": max(values), "repeats": values}
    out["ratio"] = pair.ratio
    out["ratio_bf16"] = pair.ratio_bf16
    out["bound"] = bound
    out["bound_bf16"] = bound_bf16
    return out
