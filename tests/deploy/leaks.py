"""Looking for secrets where they must not be: bytes, files, git's objects, and `ps`.

    found = leaks(blob, secrets)                # the names of the secrets in blob
    found = leaks_in_files(paths, secrets)      # {file: names}
    with CommandLines() as ps: ...              # every command line `ps` showed meanwhile
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Iterable


def leaks(data: bytes | str, secrets: dict[str, str]) -> list[str]:
    """The names of the secrets that occur in `data`."""
    blob = data.encode() if isinstance(data, str) else data
    return [name for name, value in secrets.items() if value.encode() in blob]


def leaks_in_files(files: Iterable[Path], secrets: dict[str, str]) -> dict[str, list[str]]:
    """{file: the names of the secrets in it} over the plain files among `files`."""
    found = {}
    for path in files:
        if path.is_file() and not path.is_symlink() and (names := leaks(path.read_bytes(), secrets)):
            found[str(path)] = names
    return found


def git_objects(repo: Path) -> bytes:
    """Every object of a git repository (bare or not), decompressed: commits, trees and blobs
    (a secret in a committed file is invisible in .git's zlib-compressed files)."""
    return subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=repo,
                          capture_output=True, check=True, stdin=subprocess.DEVNULL).stdout


class CommandLines:
    """Every process's command line as `ps -eww -o args` shows it (to any user of the machine),
    sampled every `every` seconds inside the `with` block."""

    def __init__(self, every: float = 0.2):
        self.every = every
        self.seen: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True)
            self.seen.update(line.strip() for line in out.stdout.splitlines())
            self.samples += 1
            self._stop.wait(self.every)
