"""`rnnlab kernels`: the kernel choices cached for this machine (rnnlab/kernels/choice.py), listed
or forgotten."""

from __future__ import annotations

import argparse

import torch

from rnnlab.kernels import choice


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="the code measured fastest on this machine, cached",
                       description="List the kernel choices cached for this machine, or forget "
                       "them so that the next training measures again (after a measurement taken "
                       "while the machine was busy). A choice holds for one CPU (model, family, "
                       "model number, stepping and ISA flags), torch version, ISA level and "
                       "--threads, and for the kernel code and compiled library that measured it: "
                       "nodes that share a cache folder each keep their own, and a change of "
                       "code or library measures again by itself.")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="the thread count the choices were measured with (default: torch's, %(default)s)")
    p.add_argument("--forget", action="store_true", help="remove them from the cache")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    entries = choice.cached_here()
    print(f"{choice.cache_file()}: {len(entries)} choice(s) for {choice.machine()} "
          f"(kernel code {choice.code_digest()}, native library {choice.library_digest()})")
    for entry in entries:
        print(f"  {choice.line(entry)}  [{entry['when']}]")
    if args.forget and entries:
        print(f"forgotten: {choice.forget_cached()}; the next training measures again")
