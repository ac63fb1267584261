"""A run store in an object store (`s3://`, `gs://`, `memory://`, any URL fsspec knows).

Credentials come only from each filesystem's own environment and config (AWS_* variables,
~/.aws, GOOGLE_APPLICATION_CREDENTIALS, ...): stage2 neither takes nor prints them.

Why writes are whole on object stores: an S3 or GCS object becomes visible under its key only when
its upload completes. s3fs sends an object under 100 MiB as one PutObject, a larger one as a multipart
upload that is visible only at CompleteMultipartUpload (and aborted when a part fails); gcsfs finalises
a simple or resumable upload at its last request. BucketStore.write therefore encodes the whole object
locally first (a temporary file) and uploads it in one call: a writer that raises, or a process killed
before the upload ends, leaves no object under the final name. fsspec's own `open(key, "wb")` is not
used for outputs: closing it (also when the `with` block raised) uploads whatever was written.

The local temporaries live in folders named `stage2-<pid>-*` in the system's temp directory; a run
that is killed cannot remove its own, so the next run removes those whose process is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from ..runtime import RunError, pid_alive
from .base import FAILURES_FILE, Entry, Store, failure_lines, safe_url, url_protocol
from .lock import BucketLock

# The pip extra that brings each object store's fsspec filesystem.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_CREDENTIAL_HELP = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials",
    "gcs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
           "`gcloud auth application-default login`",
}
TEMP_PREFIX = "stage2-"


def temporary_folder() -> tempfile.TemporaryDirectory:
    """A local scratch folder whose name says which process made it (`stage2-<pid>-*`)."""
    return tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-")


def remove_dead_temporary_folders() -> int:
    """Remove the scratch folders of stage2 processes that are gone (killed runs); return how many."""
    n = 0
    for p in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = p.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


class BucketStore(Store):
    """A prefix in an object store, through fsspec (imported only here)."""

    local = False
    keeps_index = True
    listed_means_whole = True

    def __init__(self, location: str) -> None:
        self.url = str(location).rstrip("/")
        self.protocol = url_protocol(self.url)
        self.fs, self._prefix = filesystem(self.url)

    # ------------------------------------------------------------------ names
    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"

    def key(self, uri: str) -> str:
        if not str(uri).startswith(f"{self.url}/"):
            raise ValueError(f"{safe_url(str(uri))} is not inside {self!r}")
        return str(uri)[len(self.url) + 1:]

    def _remote(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    # ------------------------------------------------------------------ reading
    def listing(self, recursive: bool = False) -> dict[str, Entry]:
        with self._errors():
            # find() of a whole subtree is one request per 1,000 keys on S3, but fsspec's walk hides
            # errors (a missing bucket lists as empty), so an empty answer is checked with ls(), which raises.
            found = self.fs.find(self._prefix, withdirs=False, detail=True) if recursive else {}
            if not found:
                found = {info["name"]: info for info in self._ls_root() if info.get("type") == "file"}
        prefix = f"{self._prefix}/" if self._prefix else ""
        entries = (_entry(name[len(prefix):], info) for name, info in found.items() if name.startswith(prefix))
        return {e.key: e for e in sorted(entries, key=lambda e: e.key)}

    def _ls_root(self) -> list[dict[str, Any]]:
        """ls() of the folder; [] for a prefix with no keys, RunError when the bucket itself is missing."""
        try:
            return list(self.fs.ls(self._prefix, detail=True))
        except FileNotFoundError:
            top = self._prefix.lstrip("/").split("/", 1)[0]
            try:
                self.fs.info(("/" if self._prefix.startswith("/") else "") + top)
            except FileNotFoundError:
                raise RunError(_missing_bucket(self.url)) from None
            return []

    def exists(self, key: str) -> bool:
        with self._errors():
            return bool(self.fs.isfile(self._remote(key)))

    def read_bytes(self, key: str) -> bytes:
        with self._errors():
            return bytes(self.fs.cat_file(self._remote(key)))

    def read_many(self, keys: list[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        with self._errors():
            got = self.fs.cat([self._remote(k) for k in keys], on_error="return")
        out = {}
        for key in keys:
            value = got.get(self._remote(key))
            if isinstance(value, (bytes, bytearray)):
                out[key] = bytes(value)
            elif not isinstance(value, FileNotFoundError):
                # A request of the batch failed (a dropped connection under load): once more on its own,
                # so a flaky moment never reads as "no such output" (which would redo the tile).
                try:
                    out[key] = self.read_bytes(key)
                except FileNotFoundError:
                    continue
        return out

    def open(self, key: str) -> IO[bytes]:
        with self._errors():
            return self.fs.open(self._remote(key), "rb")

    @contextmanager
    def local_copy(self, *keys: str) -> Iterator[Path]:
        """A download of `keys` into a scratch folder, deleted on exit."""
        with temporary_folder() as tmp:
            for key in keys:
                dest = Path(tmp) / key
                dest.parent.mkdir(parents=True, exist_ok=True)
                with self._errors():
                    try:
                        self.fs.get_file(self._remote(key), str(dest))
                    except FileNotFoundError:
                        continue
            yield Path(tmp)

    def download(self, keys: list[str], dest: Path) -> None:
        """Copy `keys` into `dest` at their relative paths, concurrently."""
        if not keys:
            return
        for key in keys:
            (dest / key).parent.mkdir(parents=True, exist_ok=True)
        with self._errors():
            self.fs.get([self._remote(k) for k in keys], [str(dest / k) for k in keys])

    # ------------------------------------------------------------------ writing
    def write(self, key: str, write: Callable[[IO[bytes]], None]) -> str:
        def produce(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                write(f)

        return self.write_path(key, produce)

    def write_path(self, key: str, produce: Callable[[Path], None]) -> str:
        with temporary_folder() as tmp:
            local = Path(tmp) / Path(key).name
            produce(local)                  # raises -> nothing uploaded
            with self._errors():
                self.fs.put_file(str(local), self._remote(key))
        return self.uri(key)

    def write_bytes(self, key: str, data: bytes) -> str:
        with self._errors():
            self.fs.pipe_file(self._remote(key), data)      # one PUT: the object appears whole
        return self.uri(key)

    def delete(self, key: str) -> None:
        with self._errors():
            try:
                self.fs.rm_file(self._remote(key))
            except FileNotFoundError:
                pass

    def make(self) -> None:
        """Keys make prefixes: nothing to create."""

    # ------------------------------------------------------------------ a run's own files
    def lock(self) -> BucketLock:
        return BucketLock(self)

    def clean_temporaries(self) -> int:
        return remove_dead_temporary_folders()

    def add_failure(self, entry: dict[str, str], so_far: list[dict[str, str]], world: int) -> None:
        """An object cannot be appended to: one process uploads its whole list after each failure;
        with several, rank 0 uploads everyone's at the end (save_failures)."""
        if world == 1:
            self.save_failures(so_far)

    def save_failures(self, failures: list[dict[str, str]]) -> None:
        if failures:
            self.write_bytes(FAILURES_FILE, failure_lines(failures))
        else:
            self.delete(FAILURES_FILE)

    # ------------------------------------------------------------------ errors
    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn what the object store raises for the whole run (bucket, credentials, access) into RunError."""
        try:
            yield
        except Exception as e:
            error = _run_level_error(e, self.url, self.protocol)
            if error is None:
                raise
            raise error from None


# ---------------------------------------------------------------------- filesystems
def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and path of `url`; RunError naming the extra to install when it is missing."""
    import fsspec

    protocol = url_protocol(url)
    extra = EXTRAS.get(protocol)
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        install = f"pip install 'stage2[{extra}]'" if extra else "install the fsspec filesystem package for it"
        raise RunError(f"{safe_url(url)}: reading {protocol}:// needs an extra package: {install}") from None
    except ValueError:
        raise RunError(f"{safe_url(url)}: unknown protocol {protocol}://: use a local path, s3://, gs:// "
                       "or another URL fsspec knows") from None
    # botocore notes where it found the credentials at INFO; the report's console shows INFO lines.
    for name in ("botocore", "aiobotocore", "s3fs", "gcsfs", "google"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    # No listings cache: a run lists once itself, and a cached listing would hide its own writes.
    fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False)
    return fs, root.rstrip("/")


def _entry(key: str, info: dict[str, Any]) -> Entry:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return Entry(key=key, size=int(info.get("size") or 0), mtime=_mtime(info),
                 etag=str(etag).strip('"') if etag else None)


def _mtime(info: dict[str, Any]) -> float | None:
    """Seconds since the epoch from whichever field the filesystem fills (S3, GCS, memory)."""
    for field in ("LastModified", "mtime", "updated", "last_modified", "created"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _run_level_error(e: Exception, url: str, protocol: str) -> RunError | None:
    """The RunError for a failure that concerns the whole folder, or None for one object's own failure.

    The message is written here from the error's kind, never copied from the exception, so that
    nothing the filesystem put in it (a key id, a signed header) reaches the console or the logs.
    """
    where = safe_url(url)
    kind = type(e).__name__
    store = EXTRAS.get(protocol, protocol)
    if kind in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "CredentialRetrievalError"):
        return RunError(f"{where}: no credentials for {protocol}:// were found: "
                        f"{_CREDENTIAL_HELP.get(store, 'configure the filesystem as its documentation says')} "
                        "(stage2 reads them only from the environment and the filesystem's own config)")
    if isinstance(e, PermissionError) or (kind in ("ClientError", "HttpError") and _is_denied(e)):
        return RunError(f"{where}: access denied: the credentials in the environment were refused or lack "
                        "permission for this bucket; check them, or the bucket's policy")
    if isinstance(e, FileNotFoundError) and _names_a_missing_bucket(e):
        return RunError(_missing_bucket(url))
    return None


def _missing_bucket(url: str) -> str:
    bucket = safe_url(url).split("://", 1)[1].split("/", 1)[0]
    return (f"{safe_url(url)}: the bucket '{bucket}' does not exist (or these credentials cannot see it): "
            "create it or correct the URL")


def _names_a_missing_bucket(e: FileNotFoundError) -> bool:
    """S3's NoSuchBucket ("The specified bucket does not exist") or GCS's, not a missing key whose path
    happens to contain the word "bucket"."""
    text = str(e).lower()
    return "nosuchbucket" in text or "bucket does not exist" in text or "bucket not found" in text


def _is_denied(e: Exception) -> bool:
    code = str(getattr(e, "code", "")) + str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
    return any(c in code for c in ("403", "401", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"))
