"""Expected mistakes, and the one place that shows them to the user."""

from __future__ import annotations

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
