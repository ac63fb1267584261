"""opt_v2 as a Cloud Optimized GeoTIFF (docs/output.md, docs/output.md#cog), and reading one back (report, evaluate).

Written with GDAL's own COG driver (rasterio.shutil.copy from an in-memory dataset): float32, bands
named B02, B03, B04, B08 (colour interpretation blue, green, red, undefined) with the band tags
`common_name` and `center_wavelength_um` (so a GIS or a STAC tool knows each band without the JSON),
the tile's metadata as dataset tags (`tags`: stage2.product.cog_tags), nodata NaN, internally
tiled, deflate or zstd with the floating-point predictor (PREDICTOR=3), overviews as `cog.overviews`
says. Why the driver and not rio-cogeo's cog_translate, which builds the same file through a VRT and
a temporary GeoTIFF: per tile the driver took 11 ms (120 px) and 16 ms (256 px), cog_translate 30
and 50 ms, for files of the same size; both pass rio-cogeo's validator (benchmarks/bench_formats.py).
The file is encoded to a temporary and renamed, or uploaded whole (stage2.store.Store.write_path).
GDAL's own temporaries (overviews) go to the system temporary folder (CPL_TMPDIR), never beside outputs.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..store import Store
from ..tiles import BANDS, N_BANDS, GeoRef, TileError

SUFFIX = ".tif"
COMPRESSIONS = ("deflate", "zstd")
# Per band, beside its description (B02 ... B08): the STAC/eo common name and the Sentinel-2A centre
# wavelength in micrometres, the names GDAL, QGIS and the STAC eo extension use for these bands.
COMMON_NAMES = ("blue", "green", "red", "nir")
CENTER_WAVELENGTHS_UM = (0.490, 0.560, 0.665, 0.842)


@dataclass(frozen=True, kw_only=True)
class CogSettings:
    """The `cog:` section of conf/predict.yaml (its comments say why each value)."""

    compress: str            # deflate | zstd, always with the floating-point predictor
    level: int               # compression level of that codec
    blocksize: int           # px side of the internal tiles
    overviews: str | int     # "auto" (GDAL: halve until the image fits one block) or how many levels
    resampling: str          # how overview pixels are computed (average, nearest, ...)

    def __post_init__(self) -> None:
        if self.compress not in COMPRESSIONS:
            raise ValueError(f"cog.compress={self.compress!r}: use one of {list(COMPRESSIONS)}")
        if str(self.overviews) != "auto" and not (isinstance(self.overviews, int) and self.overviews >= 0):
            raise ValueError(f"cog.overviews={self.overviews!r}: use auto or a number of levels (0 for none)")
        if self.blocksize % 16 or self.blocksize <= 0:
            raise ValueError(f"cog.blocksize={self.blocksize}: use a positive multiple of 16 (e.g. 256 or 512)")


def write_cog(folder: Store, key: str, opt_v2: np.ndarray, geo: GeoRef | None, settings: CogSettings, *,
              tags: Mapping[str, str] | None = None) -> bool:
    """Write `opt_v2` (4, H, W) to `key` in `folder` as a COG, atomically; return whether it is georeferenced.

    Without `geo` the file has no CRS or transform, and the caller counts it (`not_georeferenced`).
    A CRS that GDAL does not know is a TileError (the tile fails; formats.write_output removes its NPZ).
    `tags` become GDAL dataset tags (values as text). Any 4-band layer of the tile (opt_v2, or its
    per-pixel std) is written so: the band names and tags describe the bands, whatever the values are.
    """
    arr = np.ascontiguousarray(opt_v2, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != N_BANDS:       # the band descriptions and tags name 4 bands
        raise ValueError(f"a COG layer must be (4, H, W), got {arr.shape}")
    crs, transform = _georeferencing(geo)
    text_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    folder.write_path(key, lambda tmp: encode(tmp, arr, crs, transform, settings, text_tags))
    return geo is not None


def encode(dest: Path, arr: np.ndarray, crs: Any, transform: Any, settings: CogSettings,
           tags: Mapping[str, str] | None = None) -> None:
    """Encode a float32 (4, H, W) array to a COG file at `dest` (a local path), with `tags` as dataset tags.

    GDAL reads the pixels from an in-memory copy (MEM driver): a tile's output is held twice while
    it is encoded (a 4096 px scene: 2 x 256 MiB).
    """
    import rasterio
    import rasterio.shutil
    from rasterio.enums import ColorInterp
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    options = {"COMPRESS": settings.compress.upper(), "LEVEL": settings.level, "PREDICTOR": "FLOATING_POINT",
               "BLOCKSIZE": settings.blocksize, "RESAMPLING": settings.resampling.upper(),
               "BIGTIFF": "IF_SAFER"}
    if str(settings.overviews) == "auto":
        options["OVERVIEWS"] = "AUTO"
    elif settings.overviews == 0:
        options["OVERVIEWS"] = "NONE"
    else:
        options["OVERVIEW_COUNT"] = settings.overviews
    _, h, w = arr.shape
    with warnings.catch_warnings(), rasterio.Env(CPL_TMPDIR=tempfile.gettempdir()), MemoryFile() as mem_file:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)     # reported by write_cog's result instead
        with mem_file.open(driver="MEM", width=w, height=h, count=N_BANDS, dtype="float32", crs=crs,
                           transform=transform, nodata=float("nan")) as mem:
            mem.write(arr)
            for i, (band, common, wavelength) in enumerate(zip(BANDS, COMMON_NAMES, CENTER_WAVELENGTHS_UM,
                                                               strict=True), start=1):
                mem.set_band_description(i, band)
                mem.update_tags(i, common_name=common, center_wavelength_um=f"{wavelength:.3f}")
            if tags:
                mem.update_tags(**tags)
            # Viewers (QGIS, GDAL) pick a true-colour default from these instead of bands 1-2-3 as R-G-B.
            mem.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
            rasterio.shutil.copy(mem, str(dest), driver="COG", **options)


def _georeferencing(geo: GeoRef | None) -> tuple[Any, Any]:
    """rasterio's CRS and Affine for `geo`, or (None, None); TileError for a CRS GDAL does not know."""
    if geo is None:
        return None, None
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        crs = CRS.from_user_input(geo.crs)
    except CRSError:
        shown = geo.crs if len(geo.crs) < 80 else geo.crs[:77] + "..."
        raise TileError(f"crs {shown!r} is not a coordinate reference system GDAL knows",
                        'write the sidecar\'s crs as an EPSG code ("EPSG:32633") or valid WKT') from None
    return crs, Affine(*geo.transform)


@dataclass(frozen=True)
class CogOutput:
    """A COG output read back: the opt_v2 array (NaN where no data) and its georeferencing."""

    array: np.ndarray        # float32 (4, H, W)
    geo: GeoRef | None
    descriptions: tuple[str | None, ...]


def read_cog(source: str | os.PathLike) -> CogOutput:
    """Read a COG output (a local path or an fsspec URL) written by write_cog."""
    from .geotiff import georef_of, open_dataset

    ds = open_dataset(source)
    try:
        if ds.count != N_BANDS:
            raise TileError(f"{ds.count} bands, expected 4 {list(BANDS)}", "this is not a stage2 COG output")
        return CogOutput(array=ds.read(out_dtype="float32"), geo=georef_of(ds), descriptions=tuple(ds.descriptions))
    finally:
        ds.close()


def complete_shape(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """(bands, H, W) of a COG output whose every block lies inside the file; None when it is cut short or unreadable.

    A truncated TIFF still opens (its header is at the start), so a rerun checks where the blocks
    end: reading the block offsets from the header costs no pixel read.
    """
    from .geotiff import open_dataset

    try:
        ds = open_dataset(path)
    except TileError:
        return None
    try:
        size = os.path.getsize(path)
        for band in {1, ds.count}:
            for (row, col), _ in ds.block_windows(band):
                offset = ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=band)
                length = ds.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=band)
                if offset is None or length is None or int(offset) + int(length) > size:
                    return None
        return ds.count, ds.height, ds.width
    finally:
        ds.close()


def output_key(name: str) -> str:
    """`<name>.tif`: the COG output of the tile `name` (beside `<name>.npz` and `<name>.json`)."""
    return f"{name}{SUFFIX}"

