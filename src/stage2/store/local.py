"""A run store in a local folder: the standard library, atomic renames and a flock.

Writes go to `.<name>.<pid>.tmp` beside their final name and are renamed over it, so a reader
sees the old file or the whole new one; the pid says whose temporary it is, so only a dead
process's are removed. The failure list is appended one line per write with O_APPEND, so ranks
of one run never interleave their lines.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ..runtime import TMP_SUFFIX, atomic_write, atomic_write_path, pid_alive, temporary_owner
from .base import FAILURES_FILE, Entry, Store, failure_lines
from .lock import RunLock


class LocalStore(Store):
    """A local folder (a path, or a `file://` URL)."""

    local = True
    keeps_index = False
    listed_means_whole = False

    def __init__(self, location: str | os.PathLike) -> None:
        text = str(location)
        self.root = Path(text[len("file://"):] if text.lower().startswith("file://") else text).expanduser()
        self.url = str(self.root)

    # ------------------------------------------------------------------ names
    def uri(self, key: str) -> str:
        return str(self.root / key)

    def path(self, key: str) -> Path:
        return self.root / key

    def key(self, uri: str) -> str:
        return Path(uri).relative_to(self.root).as_posix()

    # ------------------------------------------------------------------ reading
    def listing(self, recursive: bool = False) -> dict[str, Entry]:
        """Files under the folder (links followed, each real folder once so a link loop ends); hidden names skipped."""
        out: dict[str, Entry] = {}
        seen: set[tuple[int, int]] = set()
        for folder, subdirs, names in os.walk(self.root, followlinks=True):
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                subdirs[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")) if recursive else []
            for name in names:
                if name.startswith("."):
                    continue
                p = Path(folder) / name
                try:
                    st = p.stat()
                except OSError:         # a dangling link
                    continue
                key = p.relative_to(self.root).as_posix()
                out[key] = Entry(key, st.st_size, st.st_mtime)
        return dict(sorted(out.items()))

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def read_many(self, keys: list[str]) -> dict[str, bytes]:
        out = {}
        for key in keys:
            try:
                out[key] = self.path(key).read_bytes()
            except OSError:
                continue
        return out

    def open(self, key: str) -> IO[bytes]:
        return open(self.path(key), "rb")

    @contextmanager
    def local_copy(self, *keys: str) -> Iterator[Path]:
        yield self.root

    # ------------------------------------------------------------------ writing
    def write(self, key: str, write: Callable[[IO[bytes]], None]) -> str:
        self._make_parents(key)
        atomic_write(self.path(key), write)
        return self.uri(key)

    def write_path(self, key: str, produce: Callable[[Path], None]) -> str:
        self._make_parents(key)
        atomic_write_path(self.path(key), produce)
        return self.uri(key)

    def write_bytes(self, key: str, data: bytes) -> str:
        return self.write(key, lambda f: f.write(data))

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def make(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def _make_parents(self, key: str) -> None:
        """The sub-folders of `key` below the root, never the root itself (a vanished output folder stays an error)."""
        parent = Path(key).parent
        for sub in reversed([parent, *parent.parents][:-1]):
            (self.root / sub).mkdir(exist_ok=True)

    # ------------------------------------------------------------------ a run's own files
    def lock(self) -> RunLock:
        return RunLock(self.root)

    def clean_temporaries(self) -> int:
        """Delete `.<name>.<pid>.tmp` files whose process is gone; a live process's temporaries (another
        rank, a writer still running) and any other hidden file (a user's `.notes.tmp`) are left alone."""
        n = 0
        if self.root.is_dir():
            for p in self.root.rglob(f".*{TMP_SUFFIX}"):
                owner = temporary_owner(p)
                if owner is not None and p.is_file() and owner != os.getpid() and not pid_alive(owner):
                    p.unlink(missing_ok=True)
                    n += 1
        return n

    def add_failure(self, entry: dict[str, str], so_far: list[dict[str, str]], world: int) -> None:
        fd = os.open(self.path(FAILURES_FILE), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, failure_lines([entry]))      # one write per line with O_APPEND: ranks never interleave
        finally:
            os.close(fd)

    def save_failures(self, failures: list[dict[str, str]]) -> None:
        """Every process appended its own lines as they came: nothing is left to write."""
