"""Runs whose input_dir or output_dir is an fsspec URL (`s3://`, `gs://`, `memory://`; SPEC 10).

A local run keeps its own code path (stage2.predict.resume, stage2.predict.lock). With a URL on
either side the run lists each folder once, and everything a rerun needs comes from those listings:
- discovery: the input listing (sizes and LastModified are each tile's `input_state`);
- completeness: an object appears only when its upload completes (stage2.storage), so an output
  whose data files and JSON (written last) are in the listing is whole;
- checkpoint and input checks: `_stage2_index.json`, written at the end of each run, records for
  every finished tile its checkpoint, its input's state and its JSON's size and ETag. An entry
  counts only while the listing still shows that very JSON; a tile without one (a run killed before
  its index was written) has its JSON read, all of them in one concurrent batch.
So a rerun over a finished prefix costs two listings and two small reads, made at the same time.

The lock is an object, `_stage2_lock.json`, naming its holder (an object store has no file locks).
A holder on this host that is gone is taken over; one on another host, or alive, refuses the run.
Taking it is a read then a write, not an atomic create: two runs started within the same fraction
of a second can both take it; the second run's read-back of the lock then usually tells them apart.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from .. import formats
from ..runtime import RunError, pid_alive, require_dir
from ..storage import Entry, Folder, is_url, relative_key, safe_url
from ..tiles import (
    FAILURES_FILE,
    INDEX_FILE,
    LOCK_FILE,
    SUMMARY_FILE,
    discover,
    input_state,
    is_reserved,
    remove_stale_temporaries,
)
from .resume import DONE, FOREIGN, INCOMPLETE, MISSING, STALE, RerunPlan

log = logging.getLogger("stage2")

Plan = Any      # stage2.predict.app.Plan (not imported: the app imports this module)

STATE_KEYS = ("input_size", "input_mtime", "sidecar_size", "sidecar_mtime")


def is_bucket_run(input_dir: str | os.PathLike, output_dir: str | os.PathLike) -> bool:
    return is_url(input_dir) or is_url(output_dir)


def location(value: Any) -> Path | str:
    """A config path as the run uses it: a URL stays text (Path would fold its `//`), a path is expanded."""
    text = str(value)
    return text.rstrip("/") if is_url(text) else Path(text).expanduser()


def check_locations(input_dir: Path | str, output_dir: Path | str) -> None:
    """A local input_dir is a folder, a local output_dir can be written, a bucket prefix is not both."""
    from .preflight import check_writable_folder

    if not is_url(input_dir):
        require_dir(Path(input_dir), "input_dir", "point input_dir at the folder of Stage 1 tiles")
    if not is_url(output_dir):
        check_writable_folder(Path(output_dir))
    elif safe_url(str(input_dir)).rstrip("/") == safe_url(str(output_dir)).rstrip("/"):
        raise RunError(f"output_dir {safe_url(str(output_dir))} is the input_dir: write Stage 2 outputs to "
                       "another prefix")


# ---------------------------------------------------------------------------- listings
def input_states(listing: dict[str, Entry], keys: list[str]) -> dict[str, dict[str, Any]]:
    """Each input's `input_state` from the listing: the tile's and its sidecar's size and LastModified."""
    states = {}
    for key in keys:
        e, side = listing[key], listing.get(key.rsplit(".", 1)[0] + ".json")
        states[key] = {"input_size": e.size, "input_mtime": e.mtime,
                       "sidecar_size": side.size if side else None, "sidecar_mtime": side.mtime if side else None}
    return states


def _read_json(folder: Folder, key: str) -> Any:
    try:
        return json.loads(folder.read_bytes(key).decode("utf-8"))
    except (OSError, ValueError):      # FileNotFoundError included: no index, no summary yet
        return None


def gather(p: Plan, recursive: bool) -> tuple[dict[str, Entry], dict[str, Entry], Any, Any]:
    """The input listing, the output listing, the index and the last summary, fetched at the same time."""
    inputs, outputs = Folder(p.input_dir), Folder(p.output_dir)
    calls = [lambda: inputs.listing(recursive) if not inputs.local else {},
             lambda: outputs.listing(recursive),
             lambda: _read_json(outputs, INDEX_FILE),
             lambda: _read_json(outputs, SUMMARY_FILE)]
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return tuple(f.result() for f in futures)    # type: ignore[return-value]


def discover_inputs(p: Plan, listing: dict[str, Entry], recursive: bool) -> tuple[list[Any], dict[str, dict]]:
    """The tile inputs (URLs, or local Paths) and each one's input_state, keyed by its key in input_dir."""
    if is_url(p.input_dir):
        keys = formats.input_keys(listing)[0]
        out = str(p.output_dir)
        if is_url(out) and out.startswith(f"{p.input_dir}/"):       # outputs under input_dir are not inputs
            below = out[len(str(p.input_dir)) + 1:] + "/"
            keys = [k for k in keys if not k.startswith(below)]
        return [f"{p.input_dir}/{k}" for k in keys], input_states(listing, keys)
    files, ignored = discover(Path(p.input_dir), recursive, suffixes=formats.INPUT_SUFFIXES)
    for f in ignored:
        log.warning("ignored %s: named like a tile but not a file", f)
    p.ignored = ignored
    return files, {relative_key(f, p.input_dir): input_state(f) for f in files}


# ---------------------------------------------------------------------------- trust
def trust(cfg: Any, p: Plan) -> None:
    """Under the lock: find the tiles, fingerprint the checkpoint, decide which outputs are done."""
    from ..checkpoint import fingerprint
    from .resume import foreign_error

    in_listing, out_listing, index, summary = gather(p, bool(cfg.recursive))
    p.files, p.states = discover_inputs(p, in_listing, bool(cfg.recursive))
    if not p.files:
        raise RunError(f"No tiles (*.npz, *.tif, *.tiff) found in {safe_url(str(p.input_dir))}")
    names = {f: formats.file_name(f, p.input_dir) for f in p.files}
    p.clashes = set(formats.input_keys(names[f] + Path(str(f)).suffix for f in p.files)[1])
    known = summary.get("checkpoint_fingerprint") if isinstance(summary, dict) else None
    p.fingerprint = fingerprint(p.checkpoint, known if isinstance(known, dict) else None)
    p.listing = out_listing
    p.index = _valid_index(index, out_listing)
    r = decide(p, names, Folder(p.output_dir), bool(cfg.skip_existing), str(cfg.output_format))
    if r.foreign and cfg.skip_existing:
        raise foreign_error(r, safe_url(str(p.output_dir)), p.checkpoint, p.fingerprint["sha256"])
    clashed = [f for f in p.files if names[f] in p.clashes]
    p.todo, p.done, p.stale, p.untrusted = sorted(r.todo + clashed, key=str), r.done, r.stale, r.untrusted


def _json_id(e: Entry) -> list[Any]:
    """What identifies one version of an output JSON in a listing (its ETag where the store gives one)."""
    return [e.size, e.etag if e.etag else e.mtime]


def _valid_index(index: Any, listing: dict[str, Entry]) -> dict[str, dict[str, Any]]:
    """The index entries whose JSON is still the very object they describe."""
    tiles = index.get("tiles") if isinstance(index, dict) else None
    if not isinstance(tiles, dict):
        return {}
    out = {}
    for name, entry in tiles.items():
        js = listing.get(f"{name}.json")
        if isinstance(entry, dict) and js is not None and entry.get("json") == _json_id(js):
            out[name] = entry
    return out


def decide(p: Plan, names: dict[Any, str], outputs: Folder, skip_existing: bool, output_format: str) -> RerunPlan:
    """Each tile's verdict from the output listing, the index, and (for tiles the index does not
    cover) their JSONs, read in one concurrent batch."""
    sha, listing = p.fingerprint["sha256"], p.listing
    verdicts: dict[Any, str] = {}
    facts: dict[str, dict[str, Any]] = {}
    unread: dict[str, Any] = {}                 # name -> file, whose JSON must be read
    for f in p.files:
        name = names[f]
        if name in p.clashes:
            continue
        *data, js = formats.output_keys(name, output_format)
        if is_reserved(name):
            verdicts[f] = MISSING
        elif js not in listing:
            verdicts[f] = INCOMPLETE if any(k in listing for k in data) else MISSING
        elif any(k not in listing or listing[k].size == 0 for k in data):
            verdicts[f] = INCOMPLETE
        elif name in p.index:
            facts[name] = p.index[name]
        else:
            unread[name] = f
    for name, text in outputs.read_many([f"{n}.json" for n in unread]).items():
        entry = _facts_of_json(text, listing[name])
        if entry is not None:
            facts[name[:-len(".json")]] = entry
    plan, counts = RerunPlan(), Counter()
    for f in p.files:
        name = names[f]
        if name in p.clashes:
            continue
        kind = verdicts.get(f) or _verdict(facts.get(name), p.states.get(relative_key(f, p.input_dir)), sha)
        counts[kind] += 1
        if kind == DONE and skip_existing:
            plan.done += 1
            p.index[name] = facts[name]
            continue
        p.index.pop(name, None)
        plan.todo.append(f)
        if kind in (INCOMPLETE, STALE, FOREIGN):
            plan.untrusted.append(name)
        plan.stale += kind == STALE
        if kind == FOREIGN:
            plan.foreign[name] = facts[name]["processing"]
    if counts[INCOMPLETE] or counts[STALE]:
        log.info("rerun: %d incomplete outputs and %d whose input changed are redone",
                 counts[INCOMPLETE], counts[STALE])
    p.index_changed = bool(unread)
    return plan


def _facts_of_json(text: bytes, js: Entry) -> dict[str, Any] | None:
    """An index entry from an output JSON; None when the JSON is unreadable (the tile is redone)."""
    try:
        processing = json.loads(text.decode("utf-8")).get("processing")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    if not isinstance(processing, dict):
        return None
    return {"json": _json_id(js), "sha256": processing.get("checkpoint_sha256"),
            "state": {k: processing.get(k) for k in STATE_KEYS},
            "processing": {k: processing.get(k) for k in ("checkpoint", "checkpoint_sha256")}}


def _verdict(facts: dict[str, Any] | None, state: dict[str, Any] | None, sha: str) -> str:
    if facts is None:
        return INCOMPLETE
    if facts.get("sha256") != sha:
        return FOREIGN
    if state is None or any(facts.get("state", {}).get(k) != v for k, v in state.items()):
        return STALE
    return DONE


# ---------------------------------------------------------------------------- after the run
def discard(output_dir: Path | str, names: list[str]) -> None:
    """Remove the outputs that will be redone (JSON first), of every format."""
    folder = Folder(output_dir)
    for name in names:
        for key in (f"{name}.json", f"{name}{formats.NPZ_SUFFIX}", formats.cog.output_key(name)):
            folder.delete(key)
    if names:
        log.info("removed %d outputs that are redone (incomplete, stale or of another checkpoint)", len(names))


def finish(p: Plan, written: list[str], failures: list[dict[str, str]] | None) -> None:
    """Save what the next rerun trusts: `_stage2_index.json` (the tiles done before and those `written` now,
    with their JSONs' ids from one listing) and, for a bucket, the failures list as one object."""
    folder = Folder(p.output_dir)
    if failures is not None and not folder.local:
        write_failures(folder, failures)
    if not written and not p.index_changed:
        return
    index = dict(p.index)
    if written:
        listing = folder.listing(recursive=any("/" in n for n in written))
        states = {formats.file_name(f, p.input_dir): p.states.get(relative_key(f, p.input_dir)) for f in p.todo}
        for name in written:
            js = listing.get(f"{name}.json")
            if js is not None:
                index[name] = {"json": _json_id(js), "sha256": p.fingerprint["sha256"], "state": states.get(name),
                               "processing": {"checkpoint": str(p.checkpoint.resolve()),
                                              "checkpoint_sha256": p.fingerprint["sha256"]}}
    body = {"about": "what a stage2 rerun trusts without reading each output JSON (stage2.predict.bucket)",
            "checkpoint_sha256": p.fingerprint["sha256"], "tiles": dict(sorted(index.items()))}
    folder.write_bytes(INDEX_FILE, (json.dumps(body, indent=1, allow_nan=False) + "\n").encode("utf-8"))


def write_failures(folder: Folder, failures: list[dict[str, str]]) -> None:
    """`_stage2_failures.jsonl` as one whole object (an object cannot be appended to); none when empty."""
    if not failures:
        folder.delete(FAILURES_FILE)
        return
    text = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
    folder.write_bytes(FAILURES_FILE, text.encode("utf-8"))


def nothing_to_do_cleanup(p: Plan) -> None:
    if not is_url(p.output_dir):
        remove_stale_temporaries(Path(p.output_dir))
    finish(p, [], None)


# ---------------------------------------------------------------------------- the lock
class BucketLock:
    """`with BucketLock(output_dir):` one run per bucket prefix: `_stage2_lock.json` names the holder.

    Refused (RunError, exit 2) while the object names a live run on this host or any run on another
    host (its liveness cannot be checked from here: the message says to delete the object if it is gone).
    """

    def __init__(self, output_dir: str) -> None:
        self.folder = Folder(output_dir)
        self.me: dict[str, Any] | None = None

    def __enter__(self) -> BucketLock:
        from .lock import is_secondary_rank

        if not is_secondary_rank():
            self._acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.me is None:
            return
        try:
            if _read_json(self.folder, LOCK_FILE) == self.me:
                self.folder.delete(LOCK_FILE)
        except Exception as e:      # the bucket went away or refuses us: the next run takes the lock over
            log.info("could not remove %s: %s", self.folder.uri(LOCK_FILE), type(e).__name__)
        self.me = None

    def _acquire(self) -> None:
        holder = _read_json(self.folder, LOCK_FILE)
        if isinstance(holder, dict) and holder:
            self._refuse_live(holder)
            log.warning("taking over the lock of a stage2 run that is gone (%s)", _describe(holder))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)[:500]}
        self.folder.write_bytes(LOCK_FILE, (json.dumps(me, indent=2) + "\n").encode("utf-8"))
        back = _read_json(self.folder, LOCK_FILE)
        if back != me:          # another run wrote its lock at the same moment
            raise RunError(f"output_dir {self.folder.url} is in use by another stage2 run ({_describe(back or {})}): "
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
        raise RunError(f"output_dir {self.folder.url} is locked by a stage2 run {where} ({_describe(holder)}): "
                       f"if that run is no longer running, delete {self.folder.uri(LOCK_FILE)}; else wait for it "
                       "to finish")


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
