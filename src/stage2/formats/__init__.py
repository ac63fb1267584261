"""Tile formats: NPZ (stage2.tiles) and GeoTIFF in, NPZ and Cloud Optimized GeoTIFF out (SPEC 2, 3, 10).

A Tile is the same object whatever the format: this module picks the reader from the file's suffix,
so discovery, bucketing and the DataLoader call one function for both. Light: rasterio is imported
only when a GeoTIFF is opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Container, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import tiles
from ..storage import Folder, filesystem, is_url, relative_key
from . import cog, geotiff

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
              input_offset: float | None, clashes: Container[str] = ()) -> tiles.Tile | tiles.TileFailure:
    """read_tile that never raises: a bad tile becomes a TileFailure (the run goes on, exit 1).

    `clashes`: output names that more than one input would write (`a.npz` beside `a.tif`); both fail.
    """
    name = tiles.tile_name(path, input_dir)
    if tiles.is_reserved(name):
        return tiles.TileFailure(name, path, f"its output {name}.json would overwrite the run's own files "
                                 f"({tiles.RESERVED_PREFIX}*)",
                                 f"rename the tile: no name may start with {tiles.RESERVED_PREFIX}")
    if name in clashes:
        return tiles.TileFailure(name, path, f"another input in input_dir has the same name {name!r} "
                                 "(e.g. a.npz beside a.tif) and would write the same output",
                                 "keep one format of this tile in input_dir, or rename one of them")
    try:
        return read_tile(path, input_dir, nan_policy=nan_policy, input_scale=input_scale, input_offset=input_offset)
    except tiles.TileError as e:
        return tiles.TileFailure(name, path, e.reason, e.hint)
    except Exception as e:  # anything unexpected still must not stop the run
        return tiles.TileFailure(name, path, f"unexpected error: {type(e).__name__}: {e}",
                                 "report this tile to the stage2 maintainers")


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
                     input_scale: float | None, input_offset: float | None,
                     clashes: Container[str] = ()) -> tiles.Tile | tiles.TileFailure:
    """load_tile for a tile in a bucket: the tile and its sidecar are downloaded into a temporary folder
    (the readers want file names), read there, and deleted again.

    `states`: each input key's `input_state` from the run's listing (size and LastModified of the tile
    and its sidecar): what the output records and a rerun compares, without another request.
    """
    folder = Folder(input_dir)
    key = folder.key(url)
    state = dict(states.get(key) or {})
    sidecar = key.rsplit(".", 1)[0] + ".json"
    keys = [key, sidecar] if state.get("sidecar_size") is not None else [key]
    with folder.local_copy(*keys) as local:
        got = load_tile(local / key, local, nan_policy=nan_policy, input_scale=input_scale,
                        input_offset=input_offset, clashes=clashes)
    got.path = url          # type: ignore[assignment]   # the file as the user named it (failures list, JSON)
    if isinstance(got, tiles.Tile):
        got.source = state
    return got


# ---------------------------------------------------------------------------- names in a listing
OUTPUT_FORMATS = ("npz", "cog", "both")


def input_keys(keys: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The tile inputs among a listing's keys (sorted), and the output names more than one input would write.

    `a.npz` beside `a.tif` both name the output `a`: the caller fails them both rather than let
    one overwrite the other's output.
    """
    inputs = sorted(k for k in keys if is_input(k))
    by_name: dict[str, list[str]] = {}
    for key in inputs:
        by_name.setdefault(key.rsplit(".", 1)[0], []).append(key)
    return inputs, {name: ks for name, ks in by_name.items() if len(ks) > 1}


def output_keys(name: str, output_format: str) -> list[str]:
    """The files of one tile's output in the order they are written: data first, the JSON last (SPEC 3)."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format={output_format!r}: use one of {list(OUTPUT_FORMATS)}")
    data = {"npz": [f"{name}{NPZ_SUFFIX}"], "cog": [f"{name}.tif"],
            "both": [f"{name}{NPZ_SUFFIX}", f"{name}.tif"]}[output_format]
    return [*data, f"{name}.json"]


def is_done(listing: Container[str], name: str, output_format: str) -> bool:
    """Whether a listing holds every file of `name`'s output in this format (a JSON of another format's run is not)."""
    return all(key in listing for key in output_keys(name, output_format))


def write_output(output_dir: str | os.PathLike | Folder, name: str, opt_v2: np.ndarray, meta: dict[str, Any], *,
                 output_format: str, geo: tiles.GeoRef | None, cog_settings: cog.CogSettings) -> bool:
    """Write one tile's output files, each atomically, data first and `<name>.json` last (SPEC 3, 10);
    return whether it is georeferenced (a COG without `geo` is not; an NPZ-only output counts as it is).

    As tiles.write_tile: the JSON is encoded before anything is written, an older JSON is removed
    before the data files are replaced, and the data files written are removed again when a later
    file fails (a COG with a CRS GDAL does not know: TileError), so a failed tile leaves no output.
    The output folder itself is never created (a vanished folder stops the run).
    """
    folder = output_dir if isinstance(output_dir, Folder) else Folder(output_dir)
    text = json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    arr = np.ascontiguousarray(opt_v2, dtype=np.float32)
    *data, js = output_keys(name, output_format)
    folder.delete(js)
    written, georeferenced = [], True
    try:
        for key in data:
            if key.endswith(NPZ_SUFFIX):
                folder.write(key, lambda f: np.savez(f, **{tiles.OUTPUT_KEY: arr}))
            else:
                georeferenced = cog.write_cog(folder, key, arr, geo, cog_settings)
            written.append(key)
        folder.write_bytes(js, text.encode("utf-8"))
    except BaseException:
        # An interrupt (SIGINT/SIGTERM raise in any Python line) may land after the JSON's rename
        # but before the try ends: the JSON goes first, so no JSON is ever left without its data.
        for key in (js, *written):
            folder.delete(key)
        raise
    return georeferenced
