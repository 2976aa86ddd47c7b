"""The `rnnlab` command (main.py) and its subcommands, one module each: generate, compare, kernels,
sweep, tune, cluster; experiments.py, where the results they name are read from (DVC experiments,
the workspace, MLflow runs); presets.py, the book's experiments as DVC experiments
(`make preset NAME=...`).
"""
