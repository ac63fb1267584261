"""The valid outputs of a folder, with everything the hand-off needs to describe them.

A valid output is a `<name>.json` whose JSON parses, is an object with `"stage": "stage2_refined"`,
and whose data files exist with a size above zero. An output written by this version carries in its
JSON what the hand-off needs (`schema_version`, `shape`, `files`, `band_stats`, and `crs`/`transform`
when it is placed): nothing else is read. An output of an earlier version lacks those keys; they are
derived here from the folder's listing (which data files it has) and its rasters (shape, band
statistics, and the COG's own georeference where its JSON has none), so a folder written by any
version gets a full hand-off.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import product
from ..store import RESERVED_PREFIX, Entry, Store
from ..tiles import GeoRef, TileError, georef_from_sidecar
from .layout import is_handoff_key
from .stats import is_complete

log = logging.getLogger("stage2")

# What an output of an earlier version may have beside its JSON: (suffix, format, layers).
LEGACY_FILES = ((product.NPZ_SUFFIX, "npz", (product.OUTPUT_KEY,)),
                (product.COG_SUFFIX, "cog", (product.OUTPUT_KEY,)))


@dataclass
class ValidOutput:
    """One valid output, as the tile list, the statistics, the TerraTorch file and the catalog see it."""

    name: str                               # the key of its JSON without ".json" (sub-folders kept)
    meta: dict[str, Any]                    # its JSON
    files: list[dict[str, Any]]             # {"path", "format", "layers"}, paths relative to the folder
    shape: tuple[int, int]                  # H, W
    band_stats: dict[str, dict[str, Any]]
    geo: GeoRef | None
    derived: list[str] = field(default_factory=list)    # keys derived from the listing or the rasters

    def file_with(self, fmt: str, layer: str = product.OUTPUT_KEY) -> str | None:
        """The path of its data file of format `fmt` that holds `layer`, or None."""
        return next((f["path"] for f in self.files if f["format"] == fmt and layer in f["layers"]), None)

    @property
    def cog(self) -> str | None:
        """Its refined COG (the image Stage 3 reads), or None for an NPZ-only output."""
        return self.file_with("cog")


def output_names(listing: Mapping[str, Entry]) -> list[str]:
    """The names of every `<name>.json` in a listing that may be an output: not a run's own file
    (`_stage2_*`), not one of the hand-off files, not a hidden or temporary file."""
    names = []
    for key in listing:
        base = key.rsplit("/", 1)[-1]
        if (key.endswith(product.JSON_SUFFIX) and not base.startswith((".", RESERVED_PREFIX))
                and not is_handoff_key(key)):
            names.append(key[:-len(product.JSON_SUFFIX)])
    return names


def read_metadata(store: Store, names: list[str]) -> dict[str, Any]:
    """name -> the parsed JSON of each `<name>.json` (one batch of reads; what does not parse is left out)."""
    raw = store.read_many([product.json_key(n) for n in names])
    out = {}
    for key, data in raw.items():
        try:
            out[key[:-len(product.JSON_SUFFIX)]] = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
    return out


def valid_outputs(store: Store, listing: Mapping[str, Entry], metadata: Mapping[str, Any],
                  ) -> tuple[list[ValidOutput], dict[str, str]]:
    """The valid outputs among `metadata` (name -> JSON), sorted by name, and name -> why each other
    Stage 2 JSON is not one. A JSON that is not a Stage 2 output's (a user's notes) is left out silently."""
    found, skipped = [], {}
    for name in sorted(metadata):
        meta = metadata[name]
        if not isinstance(meta, dict) or meta.get("stage") != product.STAGE:
            continue
        try:
            found.append(describe(store, listing, name, meta))
        except InvalidOutput as e:
            skipped[name] = str(e)
    return found, skipped


class InvalidOutput(Exception):
    """A Stage 2 JSON whose output cannot be trusted (a data file missing, empty or unreadable)."""


def describe(store: Store, listing: Mapping[str, Entry], name: str, meta: dict[str, Any]) -> ValidOutput:
    """The ValidOutput of `name`: from its JSON where that has the keys, else derived (earlier versions)."""
    derived: list[str] = []
    files = _files(listing, name, meta, derived)
    shape = _shape(meta.get("shape"))
    stats = meta.get("band_stats") if is_complete(meta.get("band_stats")) else None
    geo = _georef(meta, product.json_key(name))
    raster_geo: GeoRef | None = None
    if shape is None or stats is None:
        arr, raster_geo = _read_opt_v2(store, files, name)
        if shape is None:
            shape = (int(arr.shape[1]), int(arr.shape[2]))
            derived.append("shape")
        if stats is None:
            stats = product.band_stats(arr)
            derived.append("band_stats")
    if geo is None and "schema_version" not in meta:
        # An earlier version wrote a GeoTIFF input's georeference into the COG only.
        cog = next((f["path"] for f in files if f["format"] == "cog"), None)
        if cog is not None:
            geo = raster_geo if raster_geo is not None else _cog_georef(store, cog, name)
            if geo is not None:
                derived.append("crs")
    return ValidOutput(name, meta, files, shape, stats, geo, derived)


def _files(listing: Mapping[str, Entry], name: str, meta: dict[str, Any], derived: list[str]) -> list[dict[str, Any]]:
    """The output's data files (from its JSON, else those of its name in the listing), each checked to
    be in the listing with a size above zero."""
    files = meta.get("files")
    if isinstance(files, list) and files:
        out = [_file_entry(f, name) for f in files]
    else:
        out = [{"path": f"{name}{sfx}", "format": fmt, "layers": list(layers)}
               for sfx, fmt, layers in LEGACY_FILES if f"{name}{sfx}" in listing]
        derived.append("files")
    if not out:
        raise InvalidOutput("no data file (.npz or .tif) beside its JSON")
    for f in out:
        entry = listing.get(f["path"])
        if entry is None:
            raise InvalidOutput(f"its data file {f['path']} is missing")
        if entry.size <= 0:
            raise InvalidOutput(f"its data file {f['path']} is empty (0 bytes)")
    return out


def _file_entry(f: Any, name: str) -> dict[str, Any]:
    """One entry of the JSON's `files`, checked: a relative path inside the folder, a known format."""
    if not isinstance(f, dict) or not isinstance(f.get("path"), str) or f.get("format") not in ("npz", "cog"):
        raise InvalidOutput(f"its JSON's files entry {f!r} is not {{path, format, layers}}")
    path = f["path"]
    if path.startswith("/") or ".." in path.split("/") or "://" in path:
        raise InvalidOutput(f"its JSON names a data file outside the folder: {path!r}")
    layers = f.get("layers") if isinstance(f.get("layers"), list) else [product.OUTPUT_KEY]
    return {"path": path, "format": f["format"], "layers": [str(x) for x in layers]}


def _shape(value: Any) -> tuple[int, int] | None:
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    return None


def _georef(meta: dict[str, Any], where: str) -> GeoRef | None:
    """The JSON's `crs` and `transform` (as an NPZ sidecar carries them), or None; a malformed pair is
    logged and treated as none (the output is still listed, without a place on the map). `where`:
    the JSON's key, for the message."""
    try:
        return georef_from_sidecar(meta, where)
    except TileError as e:
        log.warning("%s: %s", where, e.reason)
        return None


def _read_opt_v2(store: Store, files: list[dict[str, Any]], name: str) -> tuple[np.ndarray, GeoRef | None]:
    """opt_v2 of an output whose JSON lacks its shape or statistics: from the NPZ where there is one
    (faster to decode), else the COG (which also gives its georeference)."""
    npz = next((f["path"] for f in files if f["format"] == "npz" and product.OUTPUT_KEY in f["layers"]), None)
    cog = next((f["path"] for f in files if f["format"] == "cog" and product.OUTPUT_KEY in f["layers"]), None)
    try:
        if npz is not None:
            with np.load(io.BytesIO(store.read_bytes(npz)), allow_pickle=False) as data:
                return np.asarray(data[product.OUTPUT_KEY], dtype=np.float32), None
        if cog is not None:
            from ..formats.cog import read_cog

            got = read_cog(store.uri(cog))
            return got.array, got.geo
    except TileError as e:
        raise InvalidOutput(f"its data file is unreadable: {e.reason}") from None
    except Exception as e:          # a damaged zip, a missing key, a vanished file
        raise InvalidOutput(f"its data file is unreadable: {type(e).__name__}: {e}") from None
    raise InvalidOutput(f"no data file holds {product.OUTPUT_KEY}")


def _cog_georef(store: Store, key: str, name: str) -> GeoRef | None:
    """The georeference in a COG's header (no pixel is read)."""
    from ..formats.geotiff import peek

    try:
        return peek(store.uri(key)).geo
    except TileError as e:
        raise InvalidOutput(f"its COG {key} is unreadable: {e.reason}") from None
