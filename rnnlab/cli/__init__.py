"""The `rnnlab` command (main.py) and its subcommands, one module each: generate, compare, kernels;
and presets.py, the book's experiments as DVC experiments (`make preset NAME=...`).
"""
