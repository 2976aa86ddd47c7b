"""Expected mistakes, and the one place that shows them to the user."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Callable

from rnnlab import phases


class UserError(Exception):
    """A mistake the user can fix (bad params, missing file, failed download).

    The message is complete on its own: what was wrong, the value, what is allowed or what to do.
    `run_main` prints it as `error: <message>` without a traceback and exits with status 2; a
    message of several lines (one per problem) gets `error: ` before each.
    """


def run_main(main: Callable[[], None]) -> None:
    """Run a stage's main(); show a UserError once, without a traceback. With RNNLAB_PROFILE set,
    record where its time went (rnnlab/phases.py)."""
    phases.begin()
    try:
        main()
        phases.record(os.environ.get("DVC_STAGE") or main.__module__)
    except UserError as err:
        for line in str(err).splitlines():  # several problems: one `error:` line each
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        raise SystemExit(0) from None


def run_program(main: Callable[[], None]) -> None:
    """`run_main(main)` as the whole program (`python -m stages.X`), with the same exit status,
    but without the interpreter's teardown of thousands of modules.

    Python still ends the program as usual: it prints an escaping exception and runs the exit
    handlers registered from here on (MLflow's among them). The last of those, registered here,
    flushes the standard streams and logging and leaves with the status at once. Child processes
    still alive get the usual exit instead.
    """
    status: list[int] = [1]  # an exception that escapes: Python prints it and exits with 1
    atexit.register(_leave, status)
    try:
        run_main(main)
    except SystemExit as err:
        code = err.code
        status[0] = code if isinstance(code, int) else 0 if code is None else 1
        raise
    status[0] = 0


def _leave(status: list[int]) -> None:
    import multiprocessing

    if multiprocessing.active_children():  # the usual exit joins or ends them
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed (a broken pipe): nothing left to write
            pass
    os._exit(status[0])
