"""The hand-off step of a run: the tile list, the TerraTorch file and the STAC catalog, rebuilt from
the outputs this run trusts (those it found done and those it wrote), never from the rest.

A rebuild reads every trusted output's JSON, so a rerun with nothing to do rebuilds only when the
files are stale: the summary records a digest of the JSONs the hand-off was built from (their
names, sizes and ETags or mtimes, from the listing a run makes anyway), and a rerun compares it.
Before a run removes outputs it will redo, it withdraws the hand-off's entry files, so that a run
killed part-way never leaves a catalog naming an output that is gone; the next run writes them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from .. import product
from ..handoff import COLLECTION_KEY, TERRATORCH_FILE, TILES_FILE
from ..store import Entry
from .plan import Plan

log = logging.getLogger("stage2")

ENTRY_KEYS = (COLLECTION_KEY, TILES_FILE, TERRATORCH_FILE)


def trusted_names(p: Plan, written: list[str]) -> list[str]:
    """The outputs the catalog may name: found done under this run's trust, and written by it."""
    return sorted(set(p.index) | set(written))


def digest(listing: dict[str, Entry], names: list[str]) -> str:
    """What the hand-off was built from: each trusted output's JSON as the listing shows it."""
    h = hashlib.blake2b(digest_size=20)      # change detection, not security
    for name in names:
        e = listing.get(product.json_key(name))
        h.update(f"{name}\t{e.size if e else -1}\t{(e.etag or e.mtime) if e else ''}\n".encode())
    return h.hexdigest()


def is_current(p: Plan) -> bool:
    """Whether the hand-off files describe exactly the outputs this rerun trusts (nothing to rebuild)."""
    recorded = (p.previous_summary or {}).get("handoff") or {}
    if recorded.get("digest") != digest(p.listing, trusted_names(p, [])):
        return False
    return TILES_FILE in p.listing and p.outputs.exists(COLLECTION_KEY)


def withdraw(p: Plan) -> None:
    """Remove the hand-off's entry files before outputs they may name are removed."""
    for key in ENTRY_KEYS:
        p.outputs.delete(key)


def rebuild(p: Plan, written: list[str]) -> dict[str, Any]:
    """Rebuild the hand-off files from the trusted outputs; return what the run summary records."""
    from ..handoff import rebuild as rebuild_folder

    names = trusted_names(p, written)
    listing = p.outputs.listing(recursive=any("/" in n for n in names))
    metadata = {}
    for key, text in p.outputs.read_many([product.json_key(n) for n in names]).items():
        try:
            metadata[key[:-len(product.JSON_SUFFIX)]] = json.loads(text.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue            # written by this run or trusted a moment ago: a damaged JSON is left out
    result = rebuild_folder(p.outputs, metadata, input_dir=str(p.input_dir))
    recorded = result.summary()
    recorded["handoff"]["digest"] = digest(listing, names)
    log.info("hand-off: %s", "; ".join(result.lines()[:4]))
    return recorded
