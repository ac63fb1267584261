"""One run per output folder: `_stage2_lock.json` names the holder; locally it is also held with flock.

The kernel drops a flock when its process dies, however it dies (SIGKILL included), so a lock
file left behind by a dead run on this host is simply taken over. The file also names its
holder (pid, host, start time, command), which is what a second run reports when it is refused.
A lock file naming another host is never taken over: flock may not reach across hosts on every
network file system, so the message says to delete the file if that run is gone.

The lock is a file that is rewritten in place, not through atomic_write: a rename would replace
the very inode that carries the flock. The flock is held on a read-only descriptor, so a run
keeps no file open for writing between batches (an administrator can still remount the folder
read-only; the run then stops, exit 3).

In a bucket, where there is no file lock, the object alone serves (BucketLock). Taking it is a read
then a write, not an atomic create: two runs started within the same fraction of a second can both
take it; the second run's read-back of the lock then usually tells them apart.
Standard library only (the "nothing to do" path takes the lock).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from ..runtime import RunError, pid_alive
from .base import LOCK_FILE, Store, safe_url

log = logging.getLogger("stage2")

# Set by the launchers of multi-process runs (Lightning's DDP children, torchrun, SLURM): a rank
# other than 0 runs inside the lock its rank 0 holds.
_RANK_ENV = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def is_secondary_rank() -> bool:
    """Whether this process is rank > 0 of a multi-process run."""
    return any(os.environ.get(k, "0").strip() not in ("", "0") for k in _RANK_ENV)


class RunLock:
    """`with RunLock(output_dir):` holds output_dir for this run; RunError (exit 2) if another run does.

    Creates output_dir when missing. If the run ends with a RunError (nothing written), the
    folders this lock created are removed again when empty, so a refused run leaves no trace.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> RunLock:
        if not is_secondary_rank():
            self._make_dirs()
            self._acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._release()
        if isinstance(error, RunError):
            for d in reversed(self._created):
                try:
                    d.rmdir()           # only when empty
                except OSError:
                    break

    # ------------------------------------------------------------------ steps
    def _make_dirs(self) -> None:
        missing = [p for p in (self.output_dir, *self.output_dir.parents) if not p.exists()]
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            self._created.append(d)

    def _acquire(self) -> None:
        for _ in range(5):      # the holder may unlink the file between our open and our flock
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunError(f"output_dir {self.output_dir} is in use by another stage2 run "
                               f"({_describe(holder)}): wait for it to finish, or choose another output_dir") from None
            except OSError as e:        # a file system without file locks (some FUSE and network mounts)
                log.warning("%s does not support file locks (%s): only the holder named in %s is checked",
                            self.output_dir, e.strerror, LOCK_FILE)
            if _same_file(fd, self.path):
                self._take(fd)
                return
            os.close(fd)
        raise RunError(f"output_dir {self.output_dir}: could not take {self.path} (other runs keep starting and "
                       "ending there): try again")

    def _take(self, fd: int) -> None:
        """The flock is ours: refuse a live-looking holder elsewhere, else write our own name in."""
        previous = _holder(fd)
        if previous:
            here = previous.get("host") == socket.gethostname()
            alive = here and previous.get("pid") != os.getpid() and pid_alive(int(previous.get("pid", 0)))
            if not here or alive:
                os.close(fd)
                where = "on another host" if not here else "still running on this host"
                raise RunError(f"output_dir {self.output_dir} is locked by a stage2 run {where} "
                               f"({_describe(previous)}): if that run is no longer running, delete {self.path}; "
                               "else wait for it to finish")
            log.warning("taking over the lock of a stage2 run that is gone (%s)", _describe(previous))
        me = _me()
        self._fd = fd
        with open(self.path, "r+b") as f:          # the same inode: _same_file checked it under the flock
            f.write((json.dumps(me, indent=2) + "\n").encode("utf-8"))
            f.truncate()

    def _release(self) -> None:
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass                # the folder is gone or read-only: the kernel frees the flock anyway
        finally:
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(fd: int) -> dict[str, Any]:
    """The holder's record in the lock file ({} when empty or unreadable: a run just starting)."""
    try:
        data = os.pread(fd, 4096, 0)
        value = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run that is just starting"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


class BucketLock:
    """`with BucketLock(store):` one run per bucket prefix: `_stage2_lock.json` names the holder.

    Refused (RunError, exit 2) while the object names a live run on this host or any run on another
    host (its liveness cannot be checked from here: the message says to delete the object if it is gone).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.me: dict[str, Any] | None = None

    def __enter__(self) -> BucketLock:
        if not is_secondary_rank():
            self._acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.me is None:
            return
        try:
            if self.store.read_json(LOCK_FILE) == self.me:
                self.store.delete(LOCK_FILE)
        except Exception as e:      # the bucket went away or refuses us: the next run takes the lock over
            log.info("could not remove %s: %s", safe_url(self.store.uri(LOCK_FILE)), type(e).__name__)
        self.me = None

    def _acquire(self) -> None:
        where = safe_url(self.store.url)
        holder = self.store.read_json(LOCK_FILE)
        if isinstance(holder, dict) and holder:
            self._refuse_live(holder)
            log.warning("taking over the lock of a stage2 run that is gone (%s)", _describe(holder))
        me = _me()
        self.store.write_json(LOCK_FILE, me)
        back = self.store.read_json(LOCK_FILE)
        if back != me:          # another run wrote its lock at the same moment
            raise RunError(f"output_dir {where} is in use by another stage2 run ({_describe(back or {})}): "
                           "wait for it to finish, or choose another output_dir")
        self.me = me

    def _refuse_live(self, holder: dict[str, Any]) -> None:
        here = holder.get("host") == socket.gethostname()
        try:
            pid = int(holder.get("pid", 0))
        except (TypeError, ValueError):
            pid = 0
        if here and (pid == os.getpid() or not pid_alive(pid)):
            return
        where = "still running on this host" if here else "on another host"
        raise RunError(f"output_dir {safe_url(self.store.url)} is locked by a stage2 run {where} "
                       f"({_describe(holder)}): if that run is no longer running, delete "
                       f"{safe_url(self.store.uri(LOCK_FILE))}; else wait for it to finish")


def _me() -> dict[str, Any]:
    """This run's record in the lock: what a refused run reports."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}
