"""`rnnlab cluster certs DIR`: a lab's TLS certificates for its Dask cluster (rnnlab/cluster/
security.py, docs/cluster.md). Needs the `cluster` extra (cryptography comes with it)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="set up a Dask cluster for sweeps: its TLS certificates",
                       description="Tools for the Dask cluster that runs rnnlab sweep and tune.")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    certs = what.add_parser("certs", help="make the lab's CA and the certificates it signs",
                            description="Make a CA and, signed by it, a certificate for the "
                            "scheduler, one for the workers and one per submitter, in DIR (keys "
                            "mode 0600). Existing files are kept: run it again with new "
                            "--submitter names to add theirs.")
    certs.add_argument("folder", metavar="DIR", type=Path)
    certs.add_argument("--submitter", action="append", default=[], metavar="NAME",
                       help="a member who submits sweeps (repeatable; default: this login's name)")
    certs.add_argument("--host", action="append", default=[], metavar="HOST",
                       help="a name or address the scheduler and workers are reached by (repeatable)")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from rnnlab.cluster import security
    from rnnlab.errors import UserError

    if args.days < 1:
        raise UserError(f"--days {args.days}: give at least 1")
    submitters = args.submitter or [security.default_submitter()]
    written = security.make_certs(args.folder, submitters, args.host, args.days)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{args.folder}: every certificate asked for is there already")
    print(f"keep {args.folder / 'ca-key.pem'} off the cluster: whoever holds it can let anyone in")
