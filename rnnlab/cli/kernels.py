"""`rnnlab kernels`: the kernel choices cached for this machine (rnnlab/kernels/choice.py), listed
or forgotten."""

from __future__ import annotations

import argparse

import torch

from rnnlab.kernels import choice


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="the code measured fastest on this machine, cached",
                       description="List the kernel choices cached for this machine (its CPU, "
                       "torch, ISA level and --threads), or forget them so that the next training "
                       "measures again (after a change of hardware, or a measurement taken while "
                       "the machine was busy).")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="the thread count the choices were measured with (default: torch's, %(default)s)")
    p.add_argument("--forget", action="store_true", help="remove them from the cache")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    entries = choice.cached_here()
    print(f"{choice.cache_file()}: {len(entries)} choice(s) for {choice.machine()}")
    for entry in entries:
        print(f"  {choice.line(entry)}  [{entry['when']}]")
    if args.forget and entries:
        print(f"forgotten: {choice.forget_cached()}; the next training measures again")
