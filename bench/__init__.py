"""Programs that measure this project's speed, one a module; their shared parts are in bench/lib/.
Not tests: none asserts a speed. Reports go to metrics/bench/, named by the CPU's kind.

    python -m bench.benchmark     our training step vs the book's and wlm's: <cpu-kind>.md, .json
    python -m bench.run_profile   a fresh clone's `dvc repro` by stage: run-profile-<cpu-kind>.*
    python -m bench.sweep         queued experiments, -j 1 vs -j N (and Dask): sweep-<cpu-kind>.*
    python -m bench.team_load     concurrent tracked trainings, server vs SQLite: team-load-*.md
    python -m bench.dvc_overhead  the CPU of dvc's own process while a stage runs: JSON, stdout
    python -m bench.preset_speed  time per epoch of word-level presets, extrapolated: stdout
    python -m bench.bf16          train.bf16 vs float32, perplexity and speed: stdout
"""
