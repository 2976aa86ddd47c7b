"""moto's S3 server for the local team stack (deploy/stack.py), its recording kept whole.

moto's recorder (MOTO_ENABLE_RECORDING) appends every request to the recording that the next
`up` replays, with two unsynchronised writes per request, while moto's server
(`python -m moto.server`) handles requests in threads. Two uploads at once (two machines pushing,
or the files of an MLflow Model) could then share one line of the recording, and the replay
failed ("Extra data"). Here the same server records one request at a time (a lock around the
recorder's write); serving stays threaded, as moto's replay sends requests to its own server.

    python deploy/s3_server.py -p 19000
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from moto.moto_api._internal.recorder.models import Recorder
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple

_turn = threading.Lock()
_record = Recorder._record_request


def _record_in_turn(self, request, body=None) -> None:
    with _turn:
        _record(self, request, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))  # moto builds its own URLs from it
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    Recorder._record_request = _record_in_turn
    run_simple(args.host, args.port, DomainDispatcherApplication(create_backend_app),
               threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
