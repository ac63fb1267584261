"""What a rerun trusts (SPEC 4): which outputs in output_dir count as done for this run.

An output is done only when its JSON (written last) and every data file of the run's
`output_format` are there and whole, it was made with this run's checkpoint
(`processing.checkpoint_sha256`) and its test-time augmentation (`processing.tta`; an output
without the key had none), its input has not changed since (`input_size`, `input_mtime`, and the
same of its sidecar), and with a `tta` other than none it has its std layer (`<name>.std.tif` for
a COG; an NPZ holds it beside opt_v2). The same code decides for a local folder and a
bucket, from one listing of each folder:
- completeness: in a bucket an object appears only when its upload completes, so a listed file is
  whole; in a local folder a file may have been cut short or replaced, so each data file's header
  (an NPZ's zip directory at its end, a COG's last block) must give the input's shape;
- checkpoint and input: each output JSON's `processing` says them. In a bucket, where every read
  is a request, `_stage2_index.json` (written at the end of each run) caches them for every
  finished tile with its JSON's size and ETag; an entry counts only while the listing still shows
  that very JSON, and a tile without one (a run killed before its index was written) has its JSON
  read, all of them in one concurrent batch. A local folder reads its JSONs (Store.keeps_index).
So a rerun over a finished bucket prefix costs two listings and two small reads; no pixel data is
read and no torch is imported.

Outputs of another checkpoint are a run-level error (exit 2) while skip_existing=true: a folder
never silently mixes two checkpoints. Outputs of another `tta` are redone (a setting, not another
model). Outputs that are not trusted and will be redone are removed before the run writes
anything new, so a tile that now fails leaves no stale output.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import formats, product
from ..runtime import RunError
from ..store import INDEX_FILE, SUMMARY_FILE, Entry, is_url, relative_key, safe_url
from ..tiles import discover, input_state, is_reserved
from .confidence import layers_for
from .plan import Plan

log = logging.getLogger("stage2")

DONE, MISSING, INCOMPLETE, STALE, FOREIGN = "done", "missing", "incomplete", "stale", "foreign"
OTHER_TTA = "other_tta"         # made with another `tta`: redone, and removed first like a stale output
NO_TTA = "none"                 # what an output JSON without `processing.tta` was made with
STATE_KEYS = ("input_size", "input_mtime", "sidecar_size", "sidecar_mtime")


@dataclass
class RerunPlan:
    """Each tile's verdict, and what the run does with them."""

    todo: list[Any] = field(default_factory=list)
    done: int = 0
    untrusted: list[str] = field(default_factory=list)      # names of outputs that exist but will be redone
    stale: int = 0                                          # of those, inputs changed since (redone_stale)
    other_tta: int = 0                                      # of those, made with another `tta`
    foreign: dict[str, Any] = field(default_factory=dict)   # name -> that output's `processing`


# ---------------------------------------------------------------------------- listings
def gather(p: Plan, recursive: bool) -> tuple[dict[str, Entry], dict[str, Entry], Any, Any]:
    """The input listing (URL inputs only), the output listing, the index and the last summary,
    fetched at the same time (in a bucket the requests overlap)."""
    calls = [lambda: p.inputs.listing(recursive) if not p.inputs.local else {},
             lambda: p.outputs.listing(recursive),
             lambda: p.outputs.read_json(INDEX_FILE) if p.outputs.keeps_index else None,
             lambda: p.outputs.read_json(SUMMARY_FILE)]
    if p.inputs.local and p.outputs.local:
        return tuple(c() for c in calls)        # type: ignore[return-value]
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return tuple(f.result() for f in futures)    # type: ignore[return-value]


def input_states(listing: dict[str, Entry], keys: list[str]) -> dict[str, dict[str, Any]]:
    """Each input's `input_state` from a bucket listing: the tile's and its sidecar's size and LastModified."""
    states = {}
    for key in keys:
        e, side = listing[key], listing.get(key.rsplit(".", 1)[0] + ".json")
        states[key] = {"input_size": e.size, "input_mtime": e.mtime,
                       "sidecar_size": side.size if side else None, "sidecar_mtime": side.mtime if side else None}
    return states


def discover_inputs(p: Plan, listing: dict[str, Entry], recursive: bool) -> None:
    """The tile inputs (Paths, or URLs) and each one's input_state, keyed by its key in input_dir."""
    if is_url(p.input_dir):
        keys = formats.input_keys(listing)[0]
        out = str(p.output_dir)
        if is_url(out) and out.startswith(f"{p.input_dir}/"):       # outputs under input_dir are not inputs
            below = out[len(str(p.input_dir)) + 1:] + "/"
            keys = [k for k in keys if not k.startswith(below)]
        p.files, p.states = [f"{p.input_dir}/{k}" for k in keys], input_states(listing, keys)
        return
    exclude = None if is_url(p.output_dir) else Path(p.output_dir)
    files, p.ignored = discover(Path(p.input_dir), recursive, exclude=exclude, suffixes=formats.INPUT_SUFFIXES)
    for f in p.ignored:
        log.warning("ignored %s: named like a tile but not a file", f)
    p.files, p.states = files, {relative_key(f, p.input_dir): input_state(f) for f in files}


# ---------------------------------------------------------------------------- trust
def trust(cfg: Any, p: Plan) -> None:
    """Under the lock: find the tiles, fingerprint the checkpoint, decide which outputs are done."""
    from ..checkpoint import fingerprint

    in_listing, p.listing, index, summary = gather(p, bool(cfg.recursive))
    discover_inputs(p, in_listing, bool(cfg.recursive))
    if not p.files:
        raise RunError(f"No tiles (*.npz, *.tif, *.tiff) found in {safe_url(str(p.input_dir))}")
    names = {f: formats.file_name(f, p.input_dir) for f in p.files}
    p.clashes = set(formats.input_keys(names[f] + Path(str(f)).suffix for f in p.files)[1])
    p.previous_summary = summary if isinstance(summary, dict) else None
    known = summary.get("checkpoint_fingerprint") if isinstance(summary, dict) else None
    p.fingerprint = fingerprint(p.checkpoint, known if isinstance(known, dict) else None)
    p.index = _valid_index(index, p.listing)
    p.tta = str(cfg.tta)
    r = decide(p, names, bool(cfg.skip_existing), str(cfg.output_format))
    if r.foreign and cfg.skip_existing:
        raise foreign_error(r, safe_url(str(p.output_dir)), p.checkpoint, p.fingerprint["sha256"])
    clashed = [f for f in p.files if names[f] in p.clashes]     # never done: they fail each run
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
        js = listing.get(product.json_key(name))
        if isinstance(entry, dict) and js is not None and entry.get("json") == _json_id(js):
            out[name] = entry
    return out


def _present(p: Plan, name: str, f: Any, output_format: str) -> str | None:
    """MISSING or INCOMPLETE from the listing (and, in a local folder, the data files' headers);
    None when every opt_v2 file of the output is there and whole (the std's: `_std_present`)."""
    *data, js = product.output_keys(name, output_format)
    if is_reserved(name):       # fails as a tile; its "output" names are the run's own files
        return MISSING
    if js not in p.listing:
        return INCOMPLETE if any(k in p.listing for k in data) else MISSING
    return _whole(p, f, data)


def _std_present(p: Plan, name: str, f: Any, output_format: str) -> str | None:
    """INCOMPLETE when an output that should have a std lacks a file of it (an NPZ holds the std in
    the same file as opt_v2, which its JSON, written last, vouches for), else None."""
    base = set(product.output_keys(name, output_format))
    extra = [k for k in product.output_keys(name, output_format, layers_for(p.tta)) if k not in base]
    return _whole(p, f, extra) if extra else None


def _whole(p: Plan, f: Any, data: list[str]) -> str | None:
    """INCOMPLETE unless each of `data` is listed, not empty and (local) of the input's shape."""
    if any(k not in p.listing or p.listing[k].size == 0 for k in data):
        return INCOMPLETE
    if not p.outputs.listed_means_whole:        # each data file's header must give the input's shape
        want = formats.peek_shape(f)
        if want is None or any(product.output_shape(p.outputs, k) != want for k in data):
            return INCOMPLETE
    return None


def decide(p: Plan, names: dict[Any, str], skip_existing: bool, output_format: str) -> RerunPlan:
    """Each tile's verdict from the output listing, the index, and (for tiles the index does not
    cover) their JSONs, read in one batch; with skip_existing=false every tile is redone."""
    sha = p.fingerprint["sha256"]
    verdicts: dict[Any, str] = {}
    facts: dict[str, dict[str, Any]] = {}
    unread: list[str] = []                 # names whose JSON must be read
    for f in p.files:
        name = names[f]
        if name in p.clashes:
            continue
        missing = _present(p, name, f, output_format)
        if missing is not None:
            verdicts[f] = missing
        elif name in p.index:
            facts[name] = p.index[name]
        else:
            unread.append(name)
    for key, text in p.outputs.read_many([product.json_key(n) for n in unread]).items():
        entry = _facts_of_json(text, p.listing[key])
        if entry is not None:
            facts[key[:-len(product.JSON_SUFFIX)]] = entry
    plan, counts = RerunPlan(), Counter()
    for f in p.files:
        name = names[f]
        if name in p.clashes:
            continue
        kind = verdicts.get(f) or _verdict(facts.get(name), p.states.get(relative_key(f, p.input_dir)), sha, p.tta)
        if kind == DONE:
            kind = _std_present(p, name, f, output_format) or DONE
        counts[kind] += 1
        if kind == DONE and skip_existing:
            plan.done += 1
            p.index[name] = facts[name]
            continue
        p.index.pop(name, None)
        plan.todo.append(f)
        if kind in (INCOMPLETE, STALE, FOREIGN, OTHER_TTA):
            plan.untrusted.append(name)
        plan.stale += kind == STALE
        plan.other_tta += kind == OTHER_TTA
        if kind == FOREIGN:
            plan.foreign[name] = facts[name]["processing"]
    if counts[INCOMPLETE] or counts[STALE]:
        log.info("rerun: %d incomplete outputs and %d whose input changed are redone",
                 counts[INCOMPLETE], counts[STALE])
    if counts[OTHER_TTA]:
        log.info("rerun: %d outputs made with another tta than tta=%s are redone", counts[OTHER_TTA], p.tta)
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
    return {"json": _json_id(js), "sha256": processing.get("checkpoint_sha256"), "tta": processing.get("tta", NO_TTA),
            "state": {k: processing.get(k) for k in STATE_KEYS},
            "processing": {k: processing.get(k) for k in ("checkpoint", "checkpoint_sha256")}}


def _verdict(facts: dict[str, Any] | None, state: dict[str, Any] | None, sha: str, tta: str) -> str:
    if facts is None:
        return INCOMPLETE
    if facts.get("sha256") != sha:
        return FOREIGN
    if facts.get("tta", NO_TTA) != tta:
        return OTHER_TTA
    if state is None or any(facts.get("state", {}).get(k) != v for k, v in state.items()):
        return STALE
    return DONE


def foreign_error(plan: RerunPlan, output_dir: Any, checkpoint: Path, sha256: str) -> RunError:
    """The run-level error for outputs of another checkpoint, naming both checkpoints and the fix."""
    theirs = Counter((p.get("checkpoint"), p.get("checkpoint_sha256")) for p in plan.foreign.values())
    (path, sha), _ = theirs.most_common(1)[0]
    other = (f"checkpoint {path} (sha256 {sha[:12]})" if sha else
             f"an unrecorded checkpoint ({path or 'unknown'}; written before stage2 recorded fingerprints)")
    more = f" and {len(theirs) - 1} other checkpoint(s)" if len(theirs) > 1 else ""
    example = sorted(plan.foreign)[0]
    return RunError(f"output_dir {output_dir} holds {len(plan.foreign)} outputs (e.g. {example}.json) made with "
                    f"{other}{more}; this run's checkpoint is {checkpoint} (sha256 {sha256[:12]}): "
                    "choose another output_dir, or pass skip_existing=false to redo them with this checkpoint")


# ---------------------------------------------------------------------------- changing the folder
def discard(p: Plan) -> None:
    """Remove the outputs that will be redone, of every format (JSON first: data files alone are never trusted)."""
    for name in p.untrusted:
        for key in product.all_keys(name):
            p.outputs.delete(key)
    if p.untrusted:
        log.info("removed %d outputs that are redone (incomplete, stale, of another checkpoint or tta)",
                 len(p.untrusted))


def finish(p: Plan, written: list[str], failures: list[dict[str, str]] | None) -> None:
    """Save what the next rerun trusts: `_stage2_index.json` (the tiles done before and those `written`
    now, with their JSONs' ids from one listing) and the failure list of every process."""
    if failures is not None:
        p.outputs.save_failures(failures)
    if not p.outputs.keeps_index or (not written and not p.index_changed):
        return
    index = dict(p.index)
    if written:
        listing = p.outputs.listing(recursive=any("/" in n for n in written))
        states = {formats.file_name(f, p.input_dir): p.states.get(relative_key(f, p.input_dir)) for f in p.todo}
        for name in written:
            js = listing.get(product.json_key(name))
            if js is not None:
                index[name] = {"json": _json_id(js), "sha256": p.fingerprint["sha256"], "tta": p.tta,
                               "state": states.get(name),
                               "processing": {"checkpoint": str(p.checkpoint.resolve()),
                                              "checkpoint_sha256": p.fingerprint["sha256"]}}
    body = {"about": "what a stage2 rerun trusts without reading each output JSON",
            "checkpoint_sha256": p.fingerprint["sha256"], "tiles": dict(sorted(index.items()))}
    p.outputs.write_json(INDEX_FILE, body, indent=1)
