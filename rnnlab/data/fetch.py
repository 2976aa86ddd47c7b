"""Fetch one file from a URL or a path, checked against its sha1, written atomically.

HTTP(S) with retries for what another attempt may fix (timeouts, dropped connections, HTTP 5xx),
a progress bar on a terminal, and one `UserError` line for everything else; `file://` URLs and
plain paths are copied. The download stage (rnnlab/data/download.py) is its user.

A server that wants a login gets it from ~/.netrc (requests reads it; NETRC names another file) or
from RNNLAB_DOWNLOAD_TOKEN, sent as `Authorization: Bearer` only to the hosts that
RNNLAB_DOWNLOAD_TOKEN_HOSTS names (a data.source of a teammate's commit or a sweep's -S may name
any host), over https or to this machine only, and never to another host a redirect leads to.
Never from the URL: data.source is refused with a secret in it (rnnlab/config.py), and every URL
shown here passes through `public_uri`.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
import urllib3
from tqdm import tqdm

from rnnlab.errors import UserError
from rnnlab.fileio import atomic_path
from rnnlab.redact import CREDENTIALS_HOWTO, TOKEN_ENV, TOKEN_HOSTS_ENV, public_text, public_uri

CHUNK = 1 << 16  # bytes per read while streaming or copying

ADVICE = (
    "check the network and run again, or fetch the file by hand and set data.source "
    "to the local copy"
)


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class _Transient(Exception):
    """A download failure worth another attempt (timeout, dropped connection, HTTP 5xx)."""


class _Bearer(requests.auth.AuthBase):
    """`Authorization: Bearer <token>`; requests drops it when a redirect changes the host."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


def fetch(
    url_or_path: str,
    dest: str | os.PathLike,
    sha1: str | None = None,
    *,
    retries: int = 3,
    timeout: float = 30.0,
    progress: bool = True,
    backoff: float = 1.0,
) -> str:
    """Copy `url_or_path` (http(s)://, file:// or a local path) to `dest`; return its sha1.

    HTTP is tried at most 1 + `retries` times, waiting `backoff` * 1, 2, 4... seconds between
    attempts; only timeouts, dropped connections and HTTP 5xx are retried. `timeout` is how
    many seconds the server may take to connect or to send the next bytes. When `sha1` is
    given, a file with another sha1 is an error. On any error `dest` is left as it was (no file
    when there was none): the bytes go to a temporary name that is renamed only at the end.
    """
    shown = public_uri(url_or_path)
    local = local_path(url_or_path)
    if local is not None:
        return _copy_local(local, Path(dest), sha1, shown=shown)
    auth = token_auth(url_or_path)
    attempts = 1 + retries
    for attempt in range(1, attempts + 1):
        try:
            return _download_once(url_or_path, Path(dest), sha1, timeout, progress, attempt, auth)
        except _Transient as err:
            problem = str(err)
            if attempt < attempts:
                print(f"{shown}: {problem}; trying again", file=sys.stderr)
                time.sleep(backoff * 2 ** (attempt - 1))
    raise UserError(
        f"download of {shown} failed: {problem} "
        f"({attempts} attempt{'s' if attempts > 1 else ''}); {ADVICE}"
    )


def token_hosts() -> list[str]:
    """RNNLAB_DOWNLOAD_TOKEN_HOSTS: the hosts (HOST or HOST:PORT, whitespace or commas between)
    that may receive the token, lower-cased."""
    return [h.lower() for h in re.split(r"[\s,]+", os.environ.get(TOKEN_HOSTS_ENV, "")) if h]


def token_auth(url: str) -> _Bearer | None:
    """RNNLAB_DOWNLOAD_TOKEN as a bearer login for `url`; None when unset or when `url`'s host is
    not in RNNLAB_DOWNLOAD_TOKEN_HOSTS (requests then reads ~/.netrc). A token is never sent in
    clear text to another machine."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        return None
    parts = urlparse(url)
    host = (parts.hostname or "").lower()
    if not {host, f"{host}:{parts.port}"} & set(token_hosts()):
        return None
    if parts.scheme.lower() != "https" and parts.hostname not in LOOPBACK:
        raise UserError(
            f"{TOKEN_ENV} is set, but {public_uri(url)} is plain http to another machine, where the "
            f"token would cross the network readable; use the https:// URL, or unset {TOKEN_ENV}"
        )
    return _Bearer(token)


def local_path(source: str) -> Path | None:
    """The file a `file://` URL or plain path names; None for http(s) URLs."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", source)
    if scheme is None:
        return Path(source).expanduser()
    kind = scheme.group(1).lower()
    if kind in ("http", "https"):
        return None
    if kind != "file":
        raise UserError(
            f"data.source = {public_uri(source)!r}: unsupported URL scheme {kind!r}; "
            "use http://, https://, file:// or a local path"
        )
    parts = urlparse(source)
    if parts.netloc not in ("", "localhost"):
        raise UserError(
            f"data.source = {public_uri(source)!r}: a file:// URL needs an absolute path, "
            f"e.g. file:///data/{parts.netloc}{parts.path}"
        )
    return Path(url2pathname(parts.path))


def _copy_local(src: Path, dest: Path, sha1: str | None, shown: str) -> str:
    try:
        f = open(src, "rb")
    except FileNotFoundError:
        raise UserError(f"{shown}: file not found (check data.source)") from None
    except IsADirectoryError:
        raise UserError(f"{shown}: is a folder, not a file (check data.source)") from None
    except PermissionError:
        raise UserError(f"{shown}: cannot read it: permission denied") from None
    digest = hashlib.sha1()
    with f, atomic_path(dest) as tmp, open(tmp, "wb") as out:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
        check_sha1(shown, sha1, digest.hexdigest())  # before the rename: a bad file never lands
    return digest.hexdigest()


def _download_once(
    url: str, dest: Path, sha1: str | None, timeout: float, progress: bool, attempt: int,
    auth: _Bearer | None = None,
) -> str:
    """One HTTP attempt. Raises _Transient for what another attempt may fix, else UserError."""
    shown = public_uri(url)
    try:
        # identity: the byte count must match Content-Length, and the sha1 is of the raw file
        with requests.get(
            url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity"}, auth=auth
        ) as resp:
            if resp.status_code >= 500:
                raise _Transient(f"HTTP {resp.status_code} {resp.reason}")
            if resp.status_code in (401, 403):
                host = urlparse(url).hostname
                sent = (f"the token in {TOKEN_ENV} was refused" if auth else
                        f"{TOKEN_ENV} is not sent to {host}: it is not in {TOKEN_HOSTS_ENV}"
                        if os.environ.get(TOKEN_ENV, "").strip() else
                        "no login was sent, or ~/.netrc's was refused")
                raise UserError(
                    f"download of {shown} failed: HTTP {resp.status_code} {resp.reason} ({sent}); "
                    f"give the server's login {CREDENTIALS_HOWTO}"
                )
            if resp.status_code >= 400:
                raise UserError(
                    f"download of {shown} failed: HTTP {resp.status_code} {resp.reason} "
                    f"(attempt {attempt}; a client error is not retried); check the URL, or "
                    "fetch the file by hand and set data.source to the local copy"
                )
            size = _content_length(resp)
            name = Path(urlparse(url).path).name
            with atomic_path(dest) as tmp:
                actual = _stream(resp, tmp, size, timeout, progress, desc=name)
                check_sha1(shown, sha1, actual)
            return actual
    except requests.Timeout:
        raise _Transient(f"timed out after {timeout:g} s waiting for an answer") from None
    except requests.ConnectionError as err:
        raise _Transient(f"connection failed ({_reason(err)})") from None
    except (requests.exceptions.InvalidURL, requests.TooManyRedirects) as err:
        raise UserError(f"download of {shown} failed: {public_text(str(err))}; check the URL") from None


def _stream(
    resp: requests.Response, tmp: Path, size: int | None, timeout: float, progress: bool, desc: str
) -> str:
    """Write the body to `tmp` with a progress bar; return its sha1."""
    digest = hashlib.sha1()
    got = 0
    # disable=None: a bar on a terminal only, so logs don't fill with carriage returns
    bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               disable=None if progress else True, file=sys.stderr)
    try:
        with bar, open(tmp, "wb") as out:
            for chunk in resp.iter_content(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    except requests.exceptions.ChunkedEncodingError:
        # urllib3 buffers a short read before it notices the end: count what left the socket
        raise _Transient(_dropped(max(got, resp.raw.tell()), size)) from None
    except requests.ConnectionError as err:
        # requests reports a read timeout in the middle of the body as a ConnectionError
        if isinstance(err.args[0] if err.args else None, urllib3.exceptions.ReadTimeoutError):
            raise _Transient(
                f"timed out after {timeout:g} s without data, {got:,} bytes in"
            ) from None
        raise _Transient(f"{_dropped(got, size)} ({_reason(err)})") from None
    if size is not None and got < size:
        raise _Transient(_dropped(got, size))
    return digest.hexdigest()


def _content_length(resp: requests.Response) -> int | None:
    """The body size the server announced, when it is a plain byte count."""
    value = resp.headers.get("Content-Length", "")
    return int(value) if value.isdigit() and "Content-Encoding" not in resp.headers else None


def _dropped(got: int, size: int | None) -> str:
    of = f" of {size:,}" if size is not None else ""
    return f"connection dropped after {got:,}{of} bytes"


def _reason(err: Exception) -> str:
    """What went wrong underneath: urllib3's MaxRetryError wraps the socket error."""
    cause = err.args[0] if err.args else err
    return str(getattr(cause, "reason", cause))


def check_sha1(where: str, expected: str | None, actual: str) -> None:
    if expected is not None and actual != expected:
        raise UserError(
            f"{where}: sha1 mismatch: expected {expected}, got {actual}; the file changed or is "
            "corrupt: set data.source to a good copy, or for a custom corpus fix data.sha1"
        )
