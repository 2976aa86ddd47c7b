"""What a worker accepts of a job, and the names a sweep may use: the trust boundary between a
submitter and the machines that run its experiments (docs/cluster.md, "Who is trusted").

`accept(job)` refuses, in one line, a job that is not plain data of the expected shape: a name
or id that could leave the sweep's folder or break a filter, a setting or remote value with a
control character (a newline would add a line to a config), a git URL that is an option or a
command transport, any environment variable but the trial's own, or a remote outside the
worker's allow-lists (RNNLAB_WORKER_GIT_REMOTES, RNNLAB_WORKER_DVC_REMOTES: fnmatch patterns,
whitespace-separated; unset: any). The same rules check the submitter's own input first.
"""

from __future__ import annotations

import fnmatch
import os
import re

from rnnlab.cluster.job import Job
from rnnlab.errors import UserError
from rnnlab.redact import credentials_in, public_uri

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
NAME_RULE = "letters, digits, _ . and - (not first: . or -; no '..'), at most 100"
SETTING = re.compile(r"[A-Za-z_][\w.@-]*=[^\x00-\x1f\x7f]*")
TARGET = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")
HEX = re.compile(r"[0-9a-f]+")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
GIT_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")
SCP_LIKE = re.compile(r"[\w.-]+@[\w.-]+:[^:]")  # git@host:lab/repo.git
DVC_SCHEMES = ("s3://", "gs://", "azure://", "ssh://", "hdfs://", "webdav://", "webdavs://",
               "http://", "https://", "oss://")
DVC_KEYS = ("url", "endpointurl")
TRACKING_SCHEMES = ("http://", "https://", "sqlite:///", "postgresql://", "postgresql+psycopg://",
                    "postgresql+psycopg2://", "mysql://", "mysql+pymysql://")
GIT_ALLOW_ENV = "RNNLAB_WORKER_GIT_REMOTES"
DVC_ALLOW_ENV = "RNNLAB_WORKER_DVC_REMOTES"


def is_name(value) -> bool:
    """Whether `value` is a name a sweep may use (an experiment's, a study's): it stays inside
    a folder, in a git ref and in an MLflow filter as written."""
    return (isinstance(value, str) and bool(NAME.fullmatch(value)) and ".." not in value
            and not value.endswith((".", ".lock")))


def check_name(flag: str, value: str) -> str:
    """`value` if it is a name (`is_name`); else a UserError naming the flag."""
    if not is_name(value):
        raise UserError(f"{flag} {value!r}: not a name: use {NAME_RULE}")
    return value


def accept(job: Job) -> None:
    """Refuse `job` in one line (a UserError naming it) unless every field is what a submitter
    of rnnlab makes, within this worker's allow-lists."""
    name = job.name if is_name(job.name) else "a job"
    try:
        _check(job)
    except ValueError as err:
        raise UserError(f"{name}: refused by the worker: {err}") from None


def _check(job: Job) -> None:
    from rnnlab.training.trial import TRIAL_ENV, parse_trial

    if not is_name(job.name):
        raise ValueError(f"name {job.name!r}: not a name: use {NAME_RULE}")
    if not (isinstance(job.sweep, str) and HEX.fullmatch(job.sweep) and len(job.sweep) <= 40):
        raise ValueError(f"sweep id {job.sweep!r} is not hexadecimal")
    if not (isinstance(job.base, str) and HEX.fullmatch(job.base) and len(job.base) == 40):
        raise ValueError(f"base {job.base!r} is not a commit (40 hex digits)")
    for setting in job.settings:
        if not (isinstance(setting, str) and SETTING.fullmatch(setting)):
            raise ValueError(f"setting {setting!r} is not KEY=VALUE without control characters")
    for target in job.targets:
        if not (isinstance(target, str) and TARGET.fullmatch(target)):
            raise ValueError(f"target {target!r} is not a stage name")
    if not (_int(job.cpus) and job.cpus >= 1 and _int(job.gpus) and job.gpus >= 0):
        raise ValueError(f"cpus {job.cpus!r}, gpus {job.gpus!r}: need cpus >= 1, gpus >= 0")
    check_git_url(job.git_url)
    check_dvc_remote(job.dvc_remote)
    if job.tracking_uri is not None:
        check_url("tracking URI", job.tracking_uri, TRACKING_SCHEMES)
    for key, value in job.env.items():
        if key != TRIAL_ENV:
            raise ValueError(f"environment variable {key!r}: a job may set only {TRIAL_ENV}")
        try:
            parse_trial(value)
        except UserError as err:
            raise ValueError(str(err)) from None


def check_git_url(url) -> None:
    """A git remote a worker may clone: a URL of a plain transport, scp-like, or an absolute
    path; no option (a leading -), no `transport::` form (ext:: runs a command)."""
    if not isinstance(url, str) or not url or CONTROL.search(url):
        raise ValueError(f"git remote {url!r} is empty or has a control character")
    if url.startswith("-") or "::" in url:
        raise ValueError(f"git remote {public_uri(url)!r}: an option or a command transport")
    if not (url.startswith(GIT_SCHEMES) or SCP_LIKE.match(url) or url.startswith("/")):
        raise ValueError(f"git remote {public_uri(url)!r}: not {', '.join(GIT_SCHEMES)}, "
                         "user@host:path or an absolute path")
    if credentials_in(url):
        raise ValueError(f"git remote {public_uri(url)!r} carries a login")
    allowed(GIT_ALLOW_ENV, "git remote", url)


def check_dvc_remote(remote) -> None:
    """The DVC remote a worker writes to its clone's config: url (and endpointurl) only."""
    if remote is None:
        return
    if not isinstance(remote, dict) or "url" not in remote or set(remote) - set(DVC_KEYS):
        raise ValueError(f"DVC remote keys {sorted(remote) if isinstance(remote, dict) else remote!r}:"
                         f" allowed: {', '.join(DVC_KEYS)} (url required)")
    url = remote["url"]
    if isinstance(url, str) and url.startswith("/") and not CONTROL.search(url):
        pass  # the submitter's own cache (--local)
    else:
        check_url("DVC remote url", url, DVC_SCHEMES)
    if "endpointurl" in remote:
        check_url("DVC remote endpointurl", remote["endpointurl"], ("http://", "https://"))
    allowed(DVC_ALLOW_ENV, "DVC remote", url)


def check_url(what: str, url, schemes: tuple[str, ...]) -> None:
    if not isinstance(url, str) or CONTROL.search(url) or url.startswith("-"):
        raise ValueError(f"{what} {url!r}: not a URL, or it has a control character")
    if not url.startswith(schemes):
        raise ValueError(f"{what} {public_uri(url)!r}: allowed: {', '.join(schemes)}")
    if credentials_in(url):
        raise ValueError(f"{what} {public_uri(url)!r} carries a login")


def allowed(env: str, what: str, url: str) -> None:
    """With `env` set on this worker, `url` must match one of its patterns."""
    patterns = os.environ.get(env, "").split()
    if patterns and not any(fnmatch.fnmatchcase(url, p) for p in patterns):
        raise ValueError(f"{what} {public_uri(url)!r} is not in this worker's {env} "
                         f"({' '.join(patterns)})")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
