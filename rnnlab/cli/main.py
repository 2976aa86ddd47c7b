"""rnnlab: text from trained models, tables of experiments and runs, this machine's kernels,
sweeps and searches on a cluster.

Each subcommand adds its parser here (`add_parser`), which sets the function that runs it (`run`):
    generate  rnnlab/cli/generate.py   text from a checkpoint, variant, run or experiment
    compare   rnnlab/cli/compare.py    one table of experiments and runs
    kernels   rnnlab/cli/kernels.py    the kernel choices cached here (rnnlab/kernels/choice.py)
    sweep     rnnlab/cli/sweep.py      a grid of DVC experiments on a Dask cluster
    tune      rnnlab/cli/tune.py       an Optuna study of DVC experiments on a Dask cluster
    cluster   rnnlab/cli/cluster.py    the cluster's TLS certificates
"""

from __future__ import annotations

import argparse

from rnnlab.cli import cluster, compare, generate, kernels, sweep, tune
from rnnlab.errors import run_main

COMMANDS = (generate, compare, kernels, sweep, tune, cluster)  # in the order --help lists them


def main(argv: list[str] | None = None) -> None:
    """Parse `rnnlab COMMAND ...` and run the command; an expected mistake (UserError) is shown
    without a traceback, exit status 2."""
    parser = argparse.ArgumentParser(prog="rnnlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    args = parser.parse_args(argv)
    run_main(lambda: args.run(args))


if __name__ == "__main__":
    main()
