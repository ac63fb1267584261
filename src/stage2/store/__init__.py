"""Where a run's files live: one interface (Store) for a local folder and a bucket.

`open_store(location)` gives a LocalStore for a path (or `file://`) and a BucketStore for any
other URL fsspec knows. Local folders never touch fsspec, so the local fast path stays light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from .base import (
    FAILURES_FILE,
    INDEX_FILE,
    LOCK_FILE,
    RESERVED_PREFIX,
    SUMMARY_FILE,
    Entry,
    Store,
    is_url,
    location,
    relative_key,
    safe_url,
)
from .local import LocalStore

__all__ = ["FAILURES_FILE", "INDEX_FILE", "LOCK_FILE", "RESERVED_PREFIX", "SUMMARY_FILE", "Entry", "LocalStore",
           "Store", "is_url", "listings", "location", "mirrored", "open_store", "relative_key", "safe_url"]


def open_store(where: str | os.PathLike | Store) -> Store:
    """The store of a folder: LocalStore for a path, BucketStore for a URL (a Store is returned as it is)."""
    if isinstance(where, Store):
        return where
    if is_url(where):
        from .remote import BucketStore

        return BucketStore(str(where))
    return LocalStore(where)


def listings(*stores: Store, recursive: bool = False) -> list[dict[str, Entry]]:
    """The listings of several stores, made at the same time (s3fs is async: the requests overlap)."""
    if len(stores) == 1 or all(s.local for s in stores):
        return [s.listing(recursive) for s in stores]
    with ThreadPoolExecutor(len(stores)) as pool:
        return list(pool.map(lambda s: s.listing(recursive), stores))


@contextmanager
def mirrored(where: str | os.PathLike, recursive: bool = False, skip: Callable[[str], bool] | None = None,
             ) -> Iterator[Path]:
    """A local folder with the files of `where`: the folder itself when local, else a download of
    its files (one listing, concurrent requests) deleted on exit. For the report and evaluate,
    which read every output anyway. `skip(key)`: keys not to download."""
    store = open_store(where)
    if isinstance(store, LocalStore):
        yield store.root
        return
    from .remote import temporary_folder

    keys = [k for k in store.listing(recursive) if not (skip and skip(k))]
    with temporary_folder() as tmp:
        store.download(keys, Path(tmp))
        yield Path(tmp)
