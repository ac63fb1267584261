"""Tile formats: NPZ (stage2.tiles) and GeoTIFF in, the Cloud Optimized GeoTIFF out (stage2.product writes it).

A Tile is the same object whatever the format: this module picks the reader from the file's suffix,
so discovery, bucketing and the DataLoader call one function for both. Light: rasterio is imported
only when a GeoTIFF is opened.
"""

from __future__ import annotations

import os
from collections.abc import Container, Iterable, Mapping
from pathlib import Path
from typing import Any

from .. import tiles
from ..store import is_url, open_store, relative_key
from . import cog, geotiff  # noqa: F401  (formats.cog is used as an attribute)

NPZ_SUFFIX = ".npz"
INPUT_SUFFIXES = (NPZ_SUFFIX, *geotiff.SUFFIXES)


def is_geotiff(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in geotiff.SUFFIXES


def is_input(name: str) -> bool:
    """Whether a file name is a tile input (`*.npz`, `*.tif`, `*.tiff`; hidden names never are)."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and Path(base).suffix.lower() in INPUT_SUFFIXES


def read_tile(path: str | os.PathLike, input_dir: str | os.PathLike | None = None, *, nan_policy: str = "fail",
              input_scale: float | None, input_offset: float | None) -> tiles.Tile:
    """Read and validate one tile of either format and its sidecar; TileError with reason and hint."""
    reader = geotiff.read_tile if is_geotiff(path) else tiles.read_tile
    return reader(path, input_dir, nan_policy=nan_policy, input_scale=input_scale, input_offset=input_offset)


def load_tile(path: Path, input_dir: Path, *, nan_policy: str, input_scale: float | None,
              input_offset: float | None, clashes: Container[str] = (),
              require_georeference: bool = False) -> tiles.Tile | tiles.TileFailure:
    """read_tile that never raises: a bad tile becomes a TileFailure (the run goes on, exit 1).

    `clashes`: output names that more than one input would write (`a.npz` beside `a.tif`); both fail.
    `require_georeference`: a tile that cannot be placed on a map fails before the model runs, so a
    GIS or Stage 3 never receives an unplaced raster (whose predictions would inherit no location).
    """
    name = tiles.tile_name(path, input_dir)
    if tiles.is_reserved(name):
        return tiles.TileFailure(name, path, f"its output {name}.json would overwrite the run's own files "
                                 f"({tiles.RESERVED_PREFIX}*)",
                                 f"rename the tile: no name may start with {tiles.RESERVED_PREFIX}")
    if name in clashes:
        return tiles.TileFailure(name, path, f"another input in input_dir has the same name {name!r} (e.g. a.npz "
                                 "beside a.tif, or a.std.npz beside a.npz: a.std.tif is a's per-pixel spread) "
                                 "and would write the same output",
                                 "keep one format of this tile in input_dir, or rename one of them")
    try:
        tile = read_tile(path, input_dir, nan_policy=nan_policy, input_scale=input_scale, input_offset=input_offset)
    except tiles.TileError as e:
        return tiles.TileFailure(name, path, e.reason, e.hint)
    except Exception as e:  # anything unexpected still must not stop the run
        return tiles.TileFailure(name, path, f"unexpected error: {type(e).__name__}: {e}",
                                 "report this tile to the stage2 maintainers")
    if require_georeference and tile.geo is None:
        where = ("the GeoTIFF has no CRS or transform" if is_geotiff(path)
                 else "its sidecar has no crs and transform")
        return tiles.TileFailure(name, path, f"cannot be placed on a map: {where} (require_georeference=true)",
                                 'add "crs" (e.g. "EPSG:32633") and "transform" (6 numbers, rasterio order) to '
                                 "the tile's JSON sidecar, or run with require_georeference=false")
    return tile


def clashing_names(files: Iterable[Path], input_dir: Path) -> set[str]:
    """Output names that more than one of `files` would write (a.npz beside a.tif): those inputs all fail."""
    return set(input_keys(tiles.tile_name(f, input_dir) + f.suffix for f in files)[1])


def peek_shape(path: str | os.PathLike, size: int | None = None) -> tuple[int, ...] | None:
    """(bands, H, W) from the file's header without its pixels; None when it cannot be read.

    A URL is read with ranged requests (an NPZ's zip directory and array header, a GeoTIFF's IFD);
    `size`, the object's size from a listing, spares the request that would ask for it.
    """
    if is_geotiff(path):
        return geotiff.peek_shape(path)
    if not is_url(path):
        return tiles.peek_shape(Path(path))
    try:
        from ..store.remote import filesystem

        fs, remote = filesystem(str(path))
        extra = {"size": size} if size is not None and fs.protocol[0] in ("s3", "s3a") else {}
        with fs.open(remote, "rb", block_size=1 << 16, **extra) as f:
            return tiles.peek_shape(f)
    except Exception:       # as for a local file: the full read reports the exact problem
        return None


def file_name(path: str | os.PathLike, input_dir: str | os.PathLike) -> str:
    """The output name of an input file, local path or URL: its path relative to input_dir, without suffix."""
    if is_url(input_dir):
        key = relative_key(path, input_dir)
        return key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key
    return tiles.tile_name(Path(path), Path(input_dir))


def load_remote_tile(url: str, input_dir: str, *, states: Mapping[str, Mapping[str, Any]], nan_policy: str,
                     input_scale: float | None, input_offset: float | None, clashes: Container[str] = (),
                     require_georeference: bool = False) -> tiles.Tile | tiles.TileFailure:
    """load_tile for a tile in a bucket: the tile and its sidecar are downloaded into a temporary folder
    (the readers want file names), read there, and deleted again.

    `states`: each input key's `input_state` from the run's listing (size and LastModified of the tile
    and its sidecar): what the output records and a rerun compares, without another request.
    """
    folder = open_store(input_dir)
    key = folder.key(url)
    state = dict(states.get(key) or {})
    sidecar = key.rsplit(".", 1)[0] + ".json"
    keys = [key, sidecar] if state.get("sidecar_size") is not None else [key]
    with folder.local_copy(*keys) as local:
        got = load_tile(local / key, local, nan_policy=nan_policy, input_scale=input_scale,
                        input_offset=input_offset, clashes=clashes, require_georeference=require_georeference)
    got.path = url          # type: ignore[assignment]   # the file as the user named it (failures list, JSON)
    if isinstance(got, tiles.Tile):
        got.source = state
    return got


# ---------------------------------------------------------------------------- names in a listing
def input_keys(keys: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The tile inputs among a listing's keys (sorted), and the output names more than one input would write.

    `a.npz` beside `a.tif` both name the output `a`: the caller fails them both rather than let
    one overwrite the other's output. So do `a.std.npz` beside `a.npz`: the COG of the first, `a.std.tif`,
    is the name of the second's per-pixel spread (docs/confidence.md).
    """
    inputs = sorted(k for k in keys if is_input(k))
    by_name: dict[str, list[str]] = {}
    for key in inputs:
        by_name.setdefault(key.rsplit(".", 1)[0], []).append(key)
    clashes = {name: ks for name, ks in by_name.items() if len(ks) > 1}
    for name, ks in by_name.items():
        base = name.removesuffix(".std")
        if base != name and base in by_name:
            clashes[name], clashes[base] = ks, by_name[base]
    return inputs, clashes
