"""moto's S3 server for the local team stack (deploy/stack.py): its recording kept whole, and
every request signed by a key of its own users and allowed by their policies.

    python deploy/s3_server.py -p 19000      # TEAM_S3_USERS: the users' file (stack.py writes it)

Each user of that file (`Users`) becomes a user of moto's IAM with its key and an inline policy
(`policy`); IAM authentication checks every request's signature and action. The gate (`guarded`)
checks presigned URLs itself (`presigned_ok`: moto checks signed headers only) and refuses moto's
own API, which could turn authentication off. moto's recorder keeps every request, one at a time
(`_record_in_turn`), for the next start to replay through the same checks (`start`), so that a
request refused once is refused again. `GET /team-ready` answers 200 once the start is over.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
from pathlib import Path
from urllib.parse import quote, unquote

from moto.moto_api._internal.recorder.models import Recorder
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

ACCOUNT = "123456789012"  # moto's default; pinned, so that no header can choose another
READY = "/team-ready"
_turn = threading.Lock()
_record = Recorder._record_request
_checked = threading.local()  # .presigned: this thread's request had its query signature checked


def _record_in_turn(self, request, body=None) -> None:
    """moto's recorder, one request at a time: its two writes per request are unsynchronised
    while requests are served in threads, so two uploads at once could share a line."""
    with _turn:
        _record(self, request, body)


def policy(buckets) -> dict:
    """The IAM policy of a user: everything (`"*"`), or S3 on `buckets` and their objects only."""
    if buckets == "*":
        return {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    resources = [f"arn:aws:s3:::{b}" for b in buckets] + [f"arn:aws:s3:::{b}/*" for b in buckets]
    return {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": resources}]}


def _skip_checked(check):
    """moto's IAM check, skipped for a request whose presigned signature the gate checked."""
    def wrapper(self, *args, **kwargs):
        if getattr(_checked, "presigned", False):
            return None
        return check(self, *args, **kwargs)
    return wrapper


def presigned_ok(environ, users: dict[str, dict]) -> bool:
    """Whether a request with a SigV4 query signature (a presigned URL) is signed by a user's
    key, unexpired, for a bucket that user may use (AWS's algorithm: canonical request, string
    to sign, HMAC chain of the secret over date, region, service)."""
    pairs = [p.split("=", 1) + [""] for p in environ.get("QUERY_STRING", "").split("&") if p]
    params = {unquote(k): unquote(v) for k, v, *_ in pairs}
    try:
        key, day, region, service, _ = params["X-Amz-Credential"].split("/")
        stamp = params["X-Amz-Date"]
        signed = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
        expires = int(params["X-Amz-Expires"])
        given = params["X-Amz-Signature"]
        header_names = params["X-Amz-SignedHeaders"].split(";")
    except (KeyError, ValueError):
        return False
    user = next((u for u in users.values() if u.get("key") == key), None)
    now = dt.datetime.now(dt.timezone.utc)
    if user is None or not signed - dt.timedelta(minutes=15) <= now <= signed + dt.timedelta(seconds=expires):
        return False
    path = (environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ["PATH_INFO"]).split("?", 1)[0]
    bucket = unquote(path).lstrip("/").split("/", 1)[0]
    if user["buckets"] != "*" and bucket not in user["buckets"]:
        return False
    enc = lambda text: quote(text, safe="-_.~")  # noqa: E731
    query = "&".join(f"{enc(k)}={enc(v)}" for k, v in sorted(params.items()) if k != "X-Amz-Signature")
    headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    canonical = "\n".join([environ["REQUEST_METHOD"], path, query,
                           "".join(f"{h}:{headers.get(h, '').strip()}\n" for h in header_names),
                           ";".join(header_names), "UNSIGNED-PAYLOAD"])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    secret = ("AWS4" + user["secret"]).encode()
    for part in (day, region, service, "aws4_request"):
        secret = hmac.new(secret, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(secret, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)


class Users:
    """moto's IAM users, kept equal to the users' file: TEAM_S3_USERS names a JSON file (mode
    0600) of `{name: {key, secret, buckets}}`, `buckets` "*" for the MLflow server's own user,
    else the buckets the user may use (members and services: the DVC remote's). It is read again
    whenever it changes (`deploy.stack user` adds to it)."""

    def __init__(self, path: Path):
        self.path = path
        self.seen: float | None = None
        self.lock = threading.Lock()

    def known(self) -> dict[str, dict]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def sync(self) -> None:
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if stamp == self.seen:
            return
        with self.lock:
            if stamp == self.seen:
                return
            from moto.iam.models import iam_backends

            iam = iam_backends[ACCOUNT]["aws"]
            wanted = json.loads(self.path.read_text())
            have = {u.name for u in iam.list_users("/", None, None)}
            for name, spec in wanted.items():
                user = iam.get_user(name) if name in have else iam.create_user("us-east-1", name)
                user.access_keys = []
                key = user.create_access_key(prefix="AKIA")
                key.access_key_id, key.secret_access_key = spec["key"], spec["secret"]
                iam.put_user_policy(name, "team", json.dumps(policy(spec["buckets"])))
            self.seen = stamp


def guarded(app, users: Users, ready: threading.Event):
    """The WSGI app behind the gate: moto's own API refused once authentication is on; the
    users' file followed; `GET /team-ready` says whether the start is over."""
    def gate(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == READY:
            status = "200 OK" if ready.is_set() else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain")])
            return [status.encode()]
        if ready.is_set():
            if path.startswith("/moto-api"):
                start_response("403 Forbidden", [("Content-Type", "text/plain")])
                return [b"moto's API is closed on the team's S3 server"]
            users.sync()
            query = environ.get("QUERY_STRING", "")
            if "Signature=" in query and "HTTP_AUTHORIZATION" not in environ:  # SigV2's too: refused
                if "X-Amz-Signature=" not in query or not presigned_ok(environ, users.known()):
                    start_response("403 Forbidden", [("Content-Type", "text/plain")])
                    return [b"AccessDenied: the presigned URL's signature does not hold"]
                _checked.presigned = True
                try:
                    return app(environ, start_response)
                finally:
                    _checked.presigned = False
        return app(environ, start_response)
    return gate


def start(port: int, users: Users | None) -> None:
    """Make the buckets that are missing and the users, turn authentication on, then replay the
    recording: each recorded request is checked again as it was the first time (one that was
    refused then is refused now)."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.s3.models import s3_backends

    s3 = s3_backends[ACCOUNT]["aws"]
    for bucket in filter(None, os.environ.get("TEAM_S3_BUCKETS", "").split(",")):
        if bucket not in s3.buckets:
            s3.create_bucket(bucket, "us-east-1")
    if users:
        users.sync()
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
    if os.environ.get("MOTO_ENABLE_RECORDING") and Path(os.environ["MOTO_RECORDER_FILEPATH"]).is_file():
        from moto.moto_api import recorder

        recorder.replay_recording(target_host=f"http://127.0.0.1:{port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))  # moto builds its own URLs from it
    os.environ["MOTO_ACCOUNT_ID"] = ACCOUNT
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    Recorder._record_request = _record_in_turn
    from moto.core.authorization import ActionAuthenticatorMixin

    ActionAuthenticatorMixin._authenticate_and_authorize_action = _skip_checked(
        ActionAuthenticatorMixin._authenticate_and_authorize_action)
    users = Users(Path(os.environ["TEAM_S3_USERS"])) if os.environ.get("TEAM_S3_USERS") else None
    ready = threading.Event()
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(args.host, args.port, guarded(app, users or Users(Path("/nonexistent")), ready),
                         threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    start(args.port, users)
    ready.set()
    thread.join()


if __name__ == "__main__":
    main()
