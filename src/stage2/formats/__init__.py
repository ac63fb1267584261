"""Tile formats: NPZ (stage2.tiles) and GeoTIFF in, NPZ and Cloud Optimized GeoTIFF out (SPEC 2, 3, 10).

A Tile is the same object whatever the format: this module picks the reader from the file's suffix,
so discovery, bucketing and the DataLoader call one function for both. Light: rasterio is imported
only when a GeoTIFF is opened.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import tiles
from . import geotiff

NPZ_SUFFIX = ".npz"
INPUT_SUFFIXES = (NPZ_SUFFIX, *geotiff.SUFFIXES)


def is_geotiff(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in geotiff.SUFFIXES


def is_input(name: str) -> bool:
    """Whether a file name is a tile input (`*.npz`, `*.tif`, `*.tiff`; hidden names never are)."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and Path(base).suffix.lower() in INPUT_SUFFIXES


def read_tile(path: str | os.PathLike, input_dir: str | os.PathLike | None = None, *,
              input_scale: float | None, input_offset: float | None) -> tiles.Tile:
    """Read and validate one tile of either format and its sidecar; TileError with reason and hint."""
    reader = geotiff.read_tile if is_geotiff(path) else tiles.read_tile
    return reader(path, input_dir, input_scale=input_scale, input_offset=input_offset)


def peek_shape(path: str | os.PathLike) -> tuple[int, ...] | None:
    """(bands, H, W) from the file's header without its pixels; None when it cannot be read."""
    return geotiff.peek_shape(path) if is_geotiff(path) else tiles.peek_shape(Path(path))
