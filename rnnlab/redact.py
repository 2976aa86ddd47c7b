"""Secrets out of everything shown or recorded: the one masking function for URIs.

Every URI that rnnlab prints, raises in an error, or writes to a file or a record goes through
`public_uri`. It hides a password in the userinfo (`https://ann:***@host`; a user name alone,
which may be a token, as `https://***@host`) and the value of every query parameter that carries
a signature or a token (an S3 presigned URL's `X-Amz-Signature`, an Azure SAS `sig`, `?token=`),
and leaves everything else as written, so the URI still says where. `credentials_in` names what
a URI carries, for the settings that must not hold a secret at all (`data.source` is a stage
param: DVC writes it to dvc.lock, which is committed and pushed).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote_plus, urlsplit, urlunsplit

MASK = "***"
TOKEN_ENV = "RNNLAB_DOWNLOAD_TOKEN"  # a download's bearer token (rnnlab/data/fetch.py)
TOKEN_HOSTS_ENV = "RNNLAB_DOWNLOAD_TOKEN_HOSTS"  # the hosts it is sent to
CREDENTIALS_HOWTO = (
    f"through ~/.netrc (`machine HOST login USER password SECRET`) or the environment variable "
    f"{TOKEN_ENV} (sent as `Authorization: Bearer` to the hosts in {TOKEN_HOSTS_ENV} only, over "
    "https or to this machine); a presigned URL cannot be split so: download the file and point "
    "data.source at the copy")

# Query parameters whose value is a credential: presigned URLs (S3, GCS), SAS tokens (Azure),
# and the names APIs use for tokens and keys. Matched whole, case-insensitively.
SECRET_PARAMS = re.compile(
    r"x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|sig|signature"
    r"|token|access_token|id_token|refresh_token|auth|authorization|api_?key|key|secret"
    r"|client_secret|password|passwd|pwd",
    re.IGNORECASE,
)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Where a user name alone may be a secret (GitHub, GitLab take a token as the user name); for
# ssh://git@host or postgresql://optuna@host it is only a name.
TOKEN_AS_USER = {"http", "https"}
_URI_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def public_uri(uri: str) -> str:
    """`uri` as it may be shown: userinfo passwords and secret query values as `***`.

    Anything that is not a URI (a path, a name) comes back unchanged."""
    if not isinstance(uri, str) or not _URI.match(uri):
        return uri
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # e.g. a bad port: show the scheme and host part only
        return uri.split("@", 1)[-1] if "@" in uri else uri
    netloc, query = parts.netloc, _masked_query(parts.query)
    if password is not None:
        netloc = f"{parts.username}:{MASK}@{netloc.rpartition('@')[2]}"
    elif "@" in netloc and parts.scheme.lower() in TOKEN_AS_USER:  # a lone name may be a token
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # as written (urlunsplit would normalise `sqlite:////abs/path`)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def public_text(text: str) -> str:
    """`text` (an error message, a log line) with every URI in it passed through `public_uri`."""
    return _URI_IN_TEXT.sub(lambda m: public_uri(m.group(0)), text)


def credentials_in(uri: str) -> list[str]:
    """What secret `uri` carries, in words ([] for none): a login in its userinfo, a secret
    query parameter by name."""
    if not isinstance(uri, str) or not _URI.match(uri):
        return []
    try:
        parts = urlsplit(uri)
    except ValueError:
        return ["an unreadable URL"]
    found = []
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else None
    if userinfo is not None and ":" in userinfo:
        found.append("a login (user:password@ before the host)")
    elif userinfo is not None and parts.scheme.lower() in TOKEN_AS_USER:
        found.append("a login (user@ before the host)")
    names = [name for name, _ in _params(parts.query) if SECRET_PARAMS.fullmatch(name)]
    if names:
        found.append(f"a signature or token in its query ({', '.join(dict.fromkeys(names))})")
    return found


def _params(query: str) -> list[tuple[str, str]]:
    return parse_qsl(query, keep_blank_values=True)


def _masked_query(query: str) -> str:
    """The query with every secret parameter's value masked, the rest as written."""
    if not any(SECRET_PARAMS.fullmatch(name) for name, _ in _params(query)):
        return query
    pieces = []
    for piece in re.split(r"[&;]", query):
        name = piece.partition("=")[0]
        pieces.append(f"{name}={MASK}" if SECRET_PARAMS.fullmatch(unquote_plus(name)) else piece)
    return "&".join(pieces)
