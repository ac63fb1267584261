"""The run store: where a run's files live, one interface for a local folder and a bucket.

A run needs few operations of its output folder: one listing, whole-object writes, a lock, the
failure list and the index of finished tiles. `LocalStore` (stage2.store.local) and `BucketStore`
(stage2.store.remote) implement the I/O each in their own way; what is the same for both (the
run's own file names, JSON helpers, the failure list's format, the index) lives here once.
Standard library only: the "nothing to do" path of a rerun uses it.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# The run's own files in an output folder. They are never outputs: their names start with
# RESERVED_PREFIX, and a tile whose name starts so fails (its output would overwrite them).
RESERVED_PREFIX = "_stage2_"
SUMMARY_FILE = "_stage2_summary.json"
FAILURES_FILE = "_stage2_failures.jsonl"
LOCK_FILE = "_stage2_lock.json"
INDEX_FILE = "_stage2_index.json"     # what a rerun trusts without reading each output JSON

_URL = re.compile(r"^(?P<protocol>[a-zA-Z][a-zA-Z0-9+.-]*)://")


@dataclass(frozen=True)
class Entry:
    """One file of a listing: what a rerun compares to trust an output, without another request."""

    key: str                 # path relative to the folder, "/"-separated
    size: int
    mtime: float | None      # seconds since the epoch (S3 LastModified, GCS updated, local st_mtime)
    etag: str | None = None  # object stores' content tag (S3 ETag, GCS md5Hash); None for local files


def is_url(location: str | os.PathLike) -> bool:
    """Whether `location` is a URL (`s3://...`) rather than a local path; `file://` counts as local."""
    m = _URL.match(str(location))
    return bool(m) and m["protocol"].lower() != "file"


def url_protocol(location: str) -> str:
    """The lower-case protocol of a URL ("s3"), "file" for a local path."""
    m = _URL.match(str(location))
    return m["protocol"].lower() if m and is_url(location) else "file"


def safe_url(url: str | os.PathLike) -> str:
    """`url` without a `user:password@` part, for messages and logs."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", str(url))


def relative_key(uri: str | os.PathLike, location: str | os.PathLike) -> str:
    """The "/"-separated key of `uri` (a path or URL inside `location`). A string operation for URLs:
    it runs once per tile (building a store per tile cost 0.24 s per 1,000 tiles in a bucket rerun)."""
    if is_url(location):
        return str(uri)[len(str(location).rstrip("/")) + 1:]
    return Path(uri).relative_to(location).as_posix()


def location(value: Any) -> Path | str:
    """A config path as a run uses it: a URL stays text (Path would fold its `//`), a path is expanded."""
    text = str(value)
    return text.rstrip("/") if is_url(text) else Path(text).expanduser()


class Store(ABC):
    """A folder of tiles or outputs. Keys are "/"-separated paths relative to the folder.

    Every write is whole: a reader (or a rerun) sees the old object or the complete new one,
    never a part, also when the writer is killed.
    """

    url: str                  # the folder as the user named it (credentials removed in messages)
    local: bool
    # Whether a run keeps `_stage2_index.json` here: a cache of what each output JSON says, so a
    # rerun need not fetch every JSON. Worth it where each read is a request; a local folder reads
    # its JSONs faster than it would keep the cache in step, and holds only outputs and run files.
    keeps_index: bool
    # Whether a listed object is whole by construction. In an object store an object appears only
    # when its upload completes; a local file can be cut short or replaced after its rename (disk
    # damage, a user's copy), so a rerun reads its header before trusting it.
    listed_means_whole: bool

    def __repr__(self) -> str:
        return f"{type(self).__name__}({safe_url(self.url)!r})"

    # ------------------------------------------------------------------ names
    @abstractmethod
    def uri(self, key: str) -> str:
        """The full path or URL of `key` (what messages, JSONs and rasterio are given)."""

    @abstractmethod
    def key(self, uri: str) -> str:
        """The key of `uri` (a full path or URL inside this folder)."""

    # ------------------------------------------------------------------ reading
    @abstractmethod
    def listing(self, recursive: bool = False) -> dict[str, Entry]:
        """Every file in the folder (sub-folders too with `recursive`), sorted by key, from one listing.

        A run lists once and answers "is it there, how big, how old" from this dict. A folder
        that does not exist lists as empty; a missing bucket or refused credentials raise RunError.
        """

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object; FileNotFoundError when it is not there."""

    @abstractmethod
    def read_many(self, keys: list[str]) -> dict[str, bytes]:
        """Several whole objects (concurrent requests where that helps); missing keys are left out."""

    @abstractmethod
    def open(self, key: str) -> IO[bytes]:
        """A binary file object for reading (remote: ranged reads, for a header or a window)."""

    @abstractmethod
    def local_copy(self, *keys: str) -> AbstractContextManager[Path]:
        """A local folder holding `keys` at their relative paths (the folder itself when local);
        a key that does not exist is skipped. For readers that want file names."""

    # ------------------------------------------------------------------ writing
    @abstractmethod
    def write(self, key: str, write: Callable[[IO[bytes]], None]) -> str:
        """Write `key` through `write(fileobj)` so that only the whole object ever appears; return its URI."""

    @abstractmethod
    def write_path(self, key: str, produce: Callable[[Path], None]) -> str:
        """Like write, for writers that need a file name: `produce(path)` creates the file at `path`."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> str:
        """Write `key` whole from memory (a JSON, a summary)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; nothing happens when it is not there."""

    @abstractmethod
    def make(self) -> None:
        """Create the folder where that means anything (an object store's prefixes need no creating)."""

    def upload(self, src: Path, keys: list[str]) -> None:
        """Copy the local files `src/<key>` whole under `keys` (a report or figures made locally)."""
        for key in keys:
            self.write_path(key, lambda tmp, key=key: _copy(src / key, tmp))

    # ------------------------------------------------------------------ a run's own files
    @abstractmethod
    def lock(self) -> AbstractContextManager[Any]:
        """`with store.lock():` one run per output folder; RunError (exit 2) when another run holds it."""

    @abstractmethod
    def clean_temporaries(self) -> int:
        """Remove what dead runs left behind (temporaries of their writes); return how many."""

    @abstractmethod
    def add_failure(self, entry: dict[str, str], so_far: list[dict[str, str]], world: int) -> None:
        """Record one failed tile in `_stage2_failures.jsonl` at once (`so_far`: this process's
        failures, `entry` included; `world`: the number of processes writing)."""

    @abstractmethod
    def save_failures(self, failures: list[dict[str, str]]) -> None:
        """At the end of a run: make the failure list hold `failures` (every process's)."""

    def reset_failures(self) -> None:
        """A run lists its own failures: the previous run's list goes at its start."""
        self.delete(FAILURES_FILE)

    def read_json(self, key: str) -> Any:
        """The parsed JSON object at `key`, None when it is missing or not JSON."""
        try:
            return json.loads(self.read_bytes(key).decode("utf-8"))
        except (OSError, ValueError):       # FileNotFoundError included
            return None

    def write_json(self, key: str, value: Any, indent: int | None = 2) -> str:
        """`value` as strict JSON (no NaN), written whole."""
        text = json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
        return self.write_bytes(key, text.encode("utf-8"))


def failure_lines(failures: list[dict[str, str]]) -> bytes:
    """`_stage2_failures.jsonl`: one JSON object per line (`file`, `reason`, `hint`)."""
    return "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures).encode("utf-8")


def _copy(src: Path, dest: Path) -> None:
    import shutil

    shutil.copyfile(src, dest)
