"""Test GeoTIFFs built from the real demo tiles (importable as `geotiffs`: pytest's pythonpath = tests).

A real CRS and a 10 m grid (EPSG:32633, WGS 84 / UTM 33N), as a Sentinel-2 product has: the tests
check that this georeferencing survives GeoTIFF -> Tile -> COG.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from helpers import REPO

DEMO = REPO / "examples" / "demo_aoi"
TILE_120 = DEMO / "ben1_20170617_4_55.npz"
TILE_256 = DEMO / "mtom_t48que_20200223_r300_c800_256x256.npz"
CRS = "EPSG:32633"
TRANSFORM = (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)   # 10 m pixels, top-left at (500000, 5000000)


def demo_array(path: Path = TILE_120) -> np.ndarray:
    with np.load(path) as npz:
        return npz["opt_v1"]


def write_geotiff(path: Path, arr: np.ndarray, *, crs: str | None = CRS, transform=TRANSFORM,
                  nodata: float | None = None, descriptions=("B02", "B03", "B04", "B08"),
                  meta: dict | None = None, blocksize: int | None = None) -> Path:
    """A GeoTIFF of `arr` (bands, H, W) in its own dtype; its `<stem>.json` sidecar when meta is given."""
    import rasterio
    from affine import Affine

    profile = {"driver": "GTiff", "width": arr.shape[2], "height": arr.shape[1], "count": arr.shape[0],
               "dtype": str(arr.dtype), "crs": crs, "nodata": nodata,
               "transform": Affine(*transform) if crs is not None else None}
    if blocksize:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(arr)
        for i, d in enumerate(descriptions or (), start=1):
            ds.set_band_description(i, d)
    if meta is not None:
        path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def to_dn(arr: np.ndarray, scale: float = 1e-4, offset: float = -0.1) -> np.ndarray:
    """Reflectance -> uint16 digital numbers as Sentinel-2 baseline 04.00 stores them (DN = (r - offset) / scale)."""
    return np.round((arr.astype(np.float64) - offset) / scale).astype(np.uint16)
