"""Folders that are local paths or fsspec URLs (SPEC 10): one listing per run, whole-object writes, clear errors.

`input_dir` and `output_dir` may be `s3://bucket/prefix`, `gs://bucket/prefix`, `memory://...` or any
URL fsspec knows. A local path (or `file://`) never touches fsspec: the local fast path stays as light
as before. Credentials come only from each filesystem's own environment and config (AWS_* variables,
~/.aws, GOOGLE_APPLICATION_CREDENTIALS, ...): stage2 neither takes nor prints them.

Why writes are atomic on object stores: an S3 or GCS object becomes visible under its key only when
its upload completes. s3fs sends an object under 100 MiB as one PutObject, a larger one as a multipart
upload that is visible only at CompleteMultipartUpload (and aborted when a part fails); gcsfs finalises
a simple or resumable upload at its last request. Folder.write therefore encodes the whole object
locally first (a temporary file) and uploads it in one call: a writer that raises, or a process killed
before the upload ends, leaves no object under the final name. fsspec's own `open(key, "wb")` is not
used for outputs: closing it (also when the `with` block raised) uploads whatever was written.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from .runtime import RunError, atomic_write, atomic_write_path

# The pip extra that brings each object store's fsspec filesystem.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_CREDENTIAL_HELP = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials",
    "gcs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
           "`gcloud auth application-default login`",
}
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


def safe_url(url: str) -> str:
    """`url` without a `user:password@` part, for messages and logs."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", str(url))


def relative_key(uri: str | os.PathLike, location: str | os.PathLike) -> str:
    """The "/"-separated key of `uri` (a path or URL inside `location`). A string operation for URLs:
    it runs once per tile (a Folder per tile cost 0.24 s per 1,000 tiles in a bucket rerun)."""
    if is_url(location):
        return str(uri)[len(str(location).rstrip("/")) + 1:]
    return Path(uri).relative_to(location).as_posix()


class Folder:
    """A folder of tiles or outputs, local or in an object store, with the few operations a run needs.

    Keys are "/"-separated paths relative to the folder. Local folders use the standard library;
    the others go through fsspec (imported only for them).
    """

    def __init__(self, location: str | os.PathLike) -> None:
        text = str(location)
        self.url = text.rstrip("/") if is_url(text) else text
        self.local = not is_url(text)
        self.protocol = "file" if self.local else _URL.match(text)["protocol"].lower()
        # Local: the folder's Path. Remote: the fsspec filesystem and the folder's path in it ("bucket/prefix").
        self._root = Path(text[len("file://"):] if text.lower().startswith("file://") else text)
        self.fs: Any = None
        self._prefix = ""
        if not self.local:
            self.fs, self._prefix = filesystem(self.url)

    def __repr__(self) -> str:
        return f"Folder({safe_url(self.url)!r})"

    # ------------------------------------------------------------------ names
    @property
    def root(self) -> Path:
        """The local folder (local folders only)."""
        if not self.local:
            raise ValueError(f"{self!r} is not local")
        return self._root

    def uri(self, key: str) -> str:
        """The full path or URL of `key` (what messages and rasterio are given)."""
        return str(self.root / key) if self.local else f"{self.url}/{key}"

    def path(self, key: str) -> Path:
        """The local path of `key` (local folders only)."""
        return self.root / key

    def _remote(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    # ------------------------------------------------------------------ reading
    def listing(self, recursive: bool = False) -> dict[str, Entry]:
        """Every file in the folder (sub-folders too with `recursive`), from one listing.

        A run lists once and answers "is it there, how big, how old" from this dict, rather than
        with one request per tile; the first listing also proves the bucket and the credentials.
        A folder (prefix) that does not exist lists as empty; a missing bucket, missing or refused
        credentials raise RunError.
        """
        if self.local:
            return _local_listing(self.root, recursive)
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
        if self.local:
            return self.path(key).is_file()
        with self._errors():
            return bool(self.fs.isfile(self._remote(key)))

    def read_bytes(self, key: str) -> bytes:
        """The whole object; FileNotFoundError when it is not there."""
        if self.local:
            return self.path(key).read_bytes()
        with self._errors():
            return bytes(self.fs.cat_file(self._remote(key)))

    def read_many(self, keys: list[str]) -> dict[str, bytes]:
        """Several whole objects at once (concurrent requests on an object store); missing keys are left out."""
        if self.local:
            out = {}
            for key in keys:
                try:
                    out[key] = self.path(key).read_bytes()
                except OSError:
                    continue
            return out
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

    def key(self, uri: str) -> str:
        """The key of `uri` (a full path or URL inside this folder)."""
        if self.local:
            return Path(uri).relative_to(self.root).as_posix()
        if not str(uri).startswith(f"{self.url}/"):
            raise ValueError(f"{safe_url(str(uri))} is not inside {self!r}")
        return relative_key(uri, self.url)

    def open(self, key: str) -> IO[bytes]:
        """A binary file object for reading (remote: ranged reads, for a header or a window)."""
        if self.local:
            return open(self.path(key), "rb")
        with self._errors():
            return self.fs.open(self._remote(key), "rb")

    @contextmanager
    def local_copy(self, *keys: str) -> Iterator[Path]:
        """A local folder holding `keys` at their relative paths: the folder itself when local, else a download.

        Lets every reader that wants a file name (np.load, the sidecar, rasterio) read a remote
        tile unchanged; the download is deleted on exit. A key that does not exist is skipped.
        """
        if self.local:
            yield self.root
            return
        with tempfile.TemporaryDirectory(prefix="stage2-") as tmp:
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
        """Copy `keys` (remote folders) into `dest` at their relative paths, concurrently."""
        if not keys:
            return
        for key in keys:
            (dest / key).parent.mkdir(parents=True, exist_ok=True)
        with self._errors():
            self.fs.get([self._remote(k) for k in keys], [str(dest / k) for k in keys])

    def upload(self, src: Path, keys: list[str]) -> None:
        """Upload the files `src/<key>` whole under `keys` (a report or figures made locally)."""
        for key in keys:
            self.write_path(key, lambda tmp, key=key: shutil.copyfile(src / key, tmp))

    # ------------------------------------------------------------------ writing
    def write(self, key: str, write: Callable[[IO[bytes]], None]) -> str:
        """Write `key` through `write(fileobj)` so that only the whole object ever appears; return its URI."""
        if self.local:
            self._make_parents(key)
            atomic_write(self.path(key), write)
            return self.uri(key)

        def produce(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                write(f)

        return self.write_path(key, produce)

    def write_path(self, key: str, produce: Callable[[Path], None]) -> str:
        """Like write, for writers that need a file name: `produce(path)` creates the file at `path`."""
        if self.local:
            self._make_parents(key)
            atomic_write_path(self.path(key), produce)
            return self.uri(key)
        with tempfile.TemporaryDirectory(prefix="stage2-") as tmp:
            local = Path(tmp) / Path(key).name
            produce(local)                  # raises -> nothing uploaded
            with self._errors():
                self.fs.put_file(str(local), self._remote(key))
        return self.uri(key)

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write `key` whole from memory (a JSON sidecar, a summary): one PUT on an object store."""
        if self.local:
            return self.write(key, lambda f: f.write(data))
        with self._errors():
            self.fs.pipe_file(self._remote(key), data)
        return self.uri(key)

    def delete(self, key: str) -> None:
        """Remove `key`; nothing happens when it is not there."""
        if self.local:
            self.path(key).unlink(missing_ok=True)
            return
        with self._errors():
            try:
                self.fs.rm_file(self._remote(key))
            except FileNotFoundError:
                pass

    def make(self) -> None:
        """Create a local folder (and its parents); an object store needs none (keys make prefixes)."""
        if self.local:
            self.root.mkdir(parents=True, exist_ok=True)

    def _make_parents(self, key: str) -> None:
        """The sub-folders of `key` below the root, never the root itself (a vanished output folder stays an error)."""
        parent = Path(key).parent
        for sub in reversed([parent, *parent.parents][:-1]):
            (self.root / sub).mkdir(exist_ok=True)

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


def listings(*folders: Folder, recursive: bool = False) -> list[dict[str, Entry]]:
    """The listings of several folders, made at the same time (s3fs is async: the requests overlap)."""
    if len(folders) == 1 or all(f.local for f in folders):
        return [f.listing(recursive) for f in folders]
    with ThreadPoolExecutor(len(folders)) as pool:
        return list(pool.map(lambda f: f.listing(recursive), folders))


@contextmanager
def mirrored(location: str | os.PathLike, recursive: bool = False, skip: Callable[[str], bool] | None = None,
             ) -> Iterator[Path]:
    """A local folder with the files of `location`: the folder itself when local, else a download of
    its files (one listing, concurrent requests) that is deleted on exit. For the report and evaluate,
    which read every output anyway. `skip(key)`: keys not to download."""
    folder = Folder(location)
    if folder.local:
        yield Path(str(location)).expanduser()
        return
    keys = [k for k in folder.listing(recursive) if not (skip and skip(k))]
    with tempfile.TemporaryDirectory(prefix="stage2-") as tmp:
        folder.download(keys, Path(tmp))
        yield Path(tmp)


# ---------------------------------------------------------------------- filesystems
def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and path of `url`; RunError naming the extra to install when it is missing."""
    import fsspec

    protocol = _URL.match(url)["protocol"].lower()
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
    """Seconds since the epoch from whichever field the filesystem fills (S3, GCS, memory, local)."""
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


def _local_listing(root: Path, recursive: bool) -> dict[str, Entry]:
    """Files under `root` (links followed, each real folder once so a link loop ends); hidden names skipped."""
    out: dict[str, Entry] = {}
    seen: set[tuple[int, int]] = set()
    for folder, subdirs, names in os.walk(root, followlinks=True):
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
            out[p.relative_to(root).as_posix()] = Entry(p.relative_to(root).as_posix(), st.st_size, st.st_mtime)
    return dict(sorted(out.items()))


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
    if isinstance(e, FileNotFoundError) and "bucket" in str(e).lower():
        return RunError(_missing_bucket(url))
    return None


def _missing_bucket(url: str) -> str:
    bucket = safe_url(url).split("://", 1)[1].split("/", 1)[0]
    return (f"{safe_url(url)}: the bucket '{bucket}' does not exist (or these credentials cannot see it): "
            "create it or correct the URL")


def _is_denied(e: Exception) -> bool:
    code = str(getattr(e, "code", "")) + str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
    return any(c in code for c in ("403", "401", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"))

