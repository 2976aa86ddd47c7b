"""Atomic file writes: every output is written to a temporary name and renamed.

A crash, a full disk or a read-only folder therefore never leaves a truncated file at the
output path: either the old file (or none) is there, or the complete new one.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rnnlab.errors import UserError

# OS errors that mean "this place cannot take the file", which the user can fix.
_USER_FIXABLE = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EPERM, errno.EDQUOT}


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds.

    On any failure the temporary file is removed and `path` is left as it was. A disk-full or
    permission error becomes a UserError naming the path.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        if err.errno in _USER_FIXABLE:
            raise UserError(
                f"cannot write {path}: {err.strerror}; nothing was written there "
                "(free some disk space or make the folder writable, then run again)"
            ) from None
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def repo_root() -> Path:
    """The repository the stage works for: DVC_ROOT, which DVC sets for every stage (the parent
    repository even under `dvc exp run --temp` and queued experiments, which run in a temporary
    copy), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


CACHE_ENV = "RNNLAB_CACHE_DIR"


def cache_dir() -> Path:
    """Where rnnlab keeps what it measured or built on this machine (kernel choices, the compiled
    time loop): $RNNLAB_CACHE_DIR, else $XDG_CACHE_HOME/rnnlab, else ~/.cache/rnnlab; outside the
    repository."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rnnlab"
