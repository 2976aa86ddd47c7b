"""Performance of the training code path against the book's own implementation, in one run.

    python -m bench.benchmark            # every default variant, batch 32 and 512 (minutes)
    python -m bench.benchmark --quick    # a smoke run (seconds)

`baselines.py`: the book's models and training step, written as d2l writes them. `flops.py`: the
FLOP count of a model per token. `benchmark.py`: the timed comparison and the other measurements
(generation, evaluation, a no-op `dvc repro`, tracking), written to metrics/bench/.
"""
