"""GeoTIFF input: a 4-band [B02, B03, B04, B08] GeoTIFF read into the same Tile as an NPZ
(docs/input.md, docs/output.md#cog).

Float rasters are reflectance; integer rasters are digital numbers scaled by tiles.to_reflectance
(input_scale, input_offset), the same function the NPZ reader uses. No-data pixels (the file's
nodata value or its mask) come back as NaN: read_tile fails them, or keeps them under nan_policy=mask.
Reads go by row blocks into one float32 array, so memory holds the result and one block,
never the raster twice; GeoTiff.read(window) reads one window (the windows of a scene).

The acquisition date travels with the tile (`acquired` in its metadata, ISO 8601): the sidecar's
`acquired` when it has one, else the date the file's own tags carry (ACQUISITION_DATE_TAGS).

rasterio is imported inside the functions: `import stage2` and the NPZ path stay light.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import numpy as np

from ..store import is_url
from ..tiles import (
    BANDS,
    DN_HINT,
    N_BANDS,
    GeoRef,
    Tile,
    TileError,
    apply_nan_policy,
    open_input,
    read_sidecar,
    to_reflectance,
    validate_array,
)

SUFFIXES = (".tif", ".tiff")
# Values per block of a whole-raster read: 4 bands x 1 M px = 16 MiB of float32 per block.
BLOCK_VALUES = 1 << 22
# Tags that carry a raster's acquisition time, most specific first (compared in any letter case, in the
# default and the IMAGERY metadata domains): stage2's own COG tag, GDAL's IMAGERY domain, the Sentinel-2
# SAFE and L1C/L2A metadata GDAL exposes, Landsat's MTL, a plain date. TIFFTAG_DATETIME comes last:
# the TIFF standard defines it as the file's creation time, which many writers set to the acquisition
# (Sentinel-2 exports, Stage 1 tools) but some to the moment they wrote the file.
ACQUISITION_DATE_TAGS = ("acquired", "ACQUISITIONDATETIME", "DATATAKE_1_DATATAKE_SENSING_START",
                         "PRODUCT_START_TIME", "SENSING_TIME", "DATATAKE_SENSING_START", "DATE_ACQUIRED",
                         "ACQUISITION_DATE", "ACQUISITION_TIME", "DATETIME", "TIFFTAG_DATETIME")
_TAG_DATE = re.compile(r"^(?P<y>\d{4})[-:/]?(?P<m>\d{2})[-:/]?(?P<d>\d{2})"
                       r"(?:[T ](?P<H>\d{2}):?(?P<M>\d{2})(?::?(?P<S>\d{2})(?P<frac>[.,]\d+)?)?)?"
                       r"\s*(?P<tz>Z|[+-]\d{2}:?\d{2})?$", re.IGNORECASE)


@dataclass(frozen=True)
class Header:
    """What a GeoTIFF is, read from its header alone (no pixels): enough to plan and bucket it."""

    shape: tuple[int, int, int]          # (bands, height, width)
    dtype: str
    nodata: float | None
    has_mask: bool                       # a nodata value, a mask band or alpha marks some pixels invalid
    geo: GeoRef | None
    descriptions: tuple[str | None, ...]
    acquired: str | None = None          # ISO 8601, from the file's date tags (ACQUISITION_DATE_TAGS)


Window = tuple[int, int, int, int]       # row, column, height, width (pixels)


class GeoTiff:
    """An open GeoTIFF input: its header, and reads of the whole raster or one window as float32 reflectance.

    `source` is a local path or an fsspec URL (read through the filesystem with ranged requests,
    so a window of a remote scene fetches only its blocks). Use as a context manager.
    """

    def __init__(self, source: str | os.PathLike, *, input_scale: float | None,
                 input_offset: float | None) -> None:
        self.source = str(source)
        self.input_scale = input_scale
        self.input_offset = input_offset
        self._ds = open_dataset(self.source)
        self.header = _header(self._ds)
        self._checked = False

    def __enter__(self) -> GeoTiff:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._ds.close()

    def check(self) -> None:
        """TileError for what the header alone shows to be wrong: band count, band order, integers without a scale."""
        bands, _, _ = self.header.shape
        if bands != N_BANDS:
            raise TileError(f"{bands} bands, expected 4 {list(BANDS)}",
                            "write a 4-band GeoTIFF with bands B02, B03, B04, B08 in that order")
        names = [(d or "").strip().upper() for d in self.header.descriptions]
        if sorted(names) == sorted(BANDS) and names != list(BANDS):
            raise TileError(f"bands are in the order {names}, expected {list(BANDS)}",
                            "reorder the bands (e.g. gdal_translate -b 3 -b 2 -b 1 -b 4 for B04, B03, B02, B08)")
        kind = np.dtype(self.header.dtype).kind
        if kind in "iu" and self.input_scale is None:
            raise TileError(f"integer raster ({self.header.dtype}) of digital numbers, and input_scale is not set",
                            DN_HINT)
        if kind not in "iuf":
            raise TileError(f"unsupported data type {self.header.dtype}", "store float32 reflectance in [0, 1] "
                            "or integer digital numbers with input_scale")
        self._checked = True

    def read(self, window: Window | None = None) -> np.ndarray:
        """float32 (4, h, w) reflectance of `window` (the whole raster when None); no-data pixels are NaN.

        The first read runs check() (a header problem is a TileError before any pixel is read).
        """
        if not self._checked:
            self.check()
        _, height, width = self.header.shape
        row, col, h, w = window if window is not None else (0, 0, height, width)
        if h <= 0 or w <= 0 or row < 0 or col < 0 or row + h > height or col + w > width:
            raise ValueError(f"window {window} is not inside the {height}x{width} raster")
        out = np.empty((N_BANDS, h, w), dtype=np.float32)
        step = max(1, BLOCK_VALUES // (N_BANDS * w))
        for r in range(0, h, step):
            n = min(step, h - r)
            out[:, r:r + n] = self._read_block(row + r, col, n, w)
        return out

    def _read_block(self, row: int, col: int, h: int, w: int) -> np.ndarray:
        from rasterio.errors import RasterioError
        from rasterio.windows import Window as RioWindow

        win = RioWindow(col, row, w, h)
        try:
            if not self.header.has_mask:
                return to_reflectance(self._ds.read(window=win), self.input_scale, self.input_offset)
            data = self._ds.read(window=win, masked=True)
        except RasterioError as e:
            raise TileError(f"unreadable GeoTIFF pixels: {_first_line(e)}",
                            "the file is damaged or was cut short: regenerate it") from None
        out = to_reflectance(np.ma.getdata(data), self.input_scale, self.input_offset)   # float from here
        out[np.ma.getmaskarray(data)] = np.nan
        return out


def peek(source: str | os.PathLike) -> Header:
    """The header of a GeoTIFF (shape, dtype, nodata, georeferencing) without reading pixels."""
    ds = open_dataset(str(source))
    try:
        return _header(ds)
    finally:
        ds.close()


def peek_shape(source: str | os.PathLike) -> tuple[int, ...] | None:
    """(bands, H, W) for bucketing tiles by size before reading them; None when the header cannot be read."""
    try:
        return peek(source).shape
    except Exception:
        return None


def read_tile(path: str | os.PathLike, input_dir: str | os.PathLike | None = None, *, nan_policy: str = "fail",
              input_scale: float | None, input_offset: float | None) -> Tile:
    """Read and validate one GeoTIFF tile and its `<stem>.json` sidecar into a Tile; TileError if it is bad.

    No-data pixels (the file's nodata value or mask) are NaN: under nan_policy=fail they fail the
    tile (reason: how many, and the nodata value); under mask they are filled for the model and NaN
    in opt_v2, as for an NPZ (tiles.apply_nan_policy). The georeferencing comes from the file, and so
    does `acquired` (ISO 8601) when the sidecar has none and the file's tags carry a date.
    """
    path, name, source = open_input(path, input_dir, nan_policy)
    with GeoTiff(path, input_scale=input_scale, input_offset=input_offset) as tif:
        raw = tif.read()
        header = tif.header
    if nan_policy == "fail" and header.has_mask:
        _fail_on_nodata(raw, header)
    arr, clipped = validate_array(raw, allow_nan=nan_policy == "mask")
    meta, month, biome, defaults = read_sidecar(path)
    if meta.get("acquired") in (None, "") and header.acquired:
        meta["acquired"] = header.acquired
    tile = Tile(name=name, path=path, array=arr, meta=meta, month=month, biome=biome,
                defaults=defaults, clipped=clipped, geo=header.geo, source=source)
    return apply_nan_policy(tile, nan_policy)


def _fail_on_nodata(raw: np.ndarray, header: Header) -> None:
    """The nan_policy=fail error for a GeoTIFF's no-data pixels, naming its nodata value."""
    n_nodata = int(np.count_nonzero(np.isnan(raw).any(axis=0)))
    if n_nodata:
        value = f"nodata value {header.nodata:g}" if header.nodata is not None else "mask"
        raise TileError(f"{n_nodata} no-data pixels (the file's {value})",
                        "crop Stage 1 tiles to valid pixels, or fill them, or run with nan_policy=mask to "
                        "refine the valid pixels and keep these as NaN")


# ---------------------------------------------------------------------------- rasterio
def open_dataset(source: str | os.PathLike) -> Any:
    """A rasterio dataset for a local path or an fsspec URL; TileError when it is not a readable GeoTIFF."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    source = str(source)
    opener = _filesystem(source) if is_url(source) else None
    try:
        with warnings.catch_warnings():     # no CRS is a state the caller reports (not_georeferenced)
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(source, opener=opener)
    except RasterioError as e:
        if os.path.isfile(source) and os.path.getsize(source) == 0:
            raise TileError("empty file (0 bytes)", "Stage 1 did not finish this tile: regenerate it") from None
        raise TileError(f"not a readable GeoTIFF: {_first_line(e)}",
                        "the file is damaged, cut short or not a GeoTIFF: regenerate it") from None


def _header(ds: Any) -> Header:
    from rasterio.enums import MaskFlags

    flags = ds.mask_flag_enums
    has_mask = any(f != [MaskFlags.all_valid] for f in flags)
    return Header(shape=(ds.count, ds.height, ds.width), dtype=str(ds.dtypes[0]), nodata=ds.nodata,
                  has_mask=has_mask, geo=georef_of(ds), descriptions=tuple(ds.descriptions),
                  acquired=acquisition_date(ds))


def acquisition_date(ds: Any) -> str | None:
    """The acquisition time the dataset's tags carry (ACQUISITION_DATE_TAGS, first that parses), as ISO 8601."""
    tags: dict[str, str] = {}
    for ns in ("IMAGERY", None):        # the default domain wins where both name a key
        try:
            tags.update({k.upper(): v for k, v in ds.tags(ns=ns).items()})
        except Exception:               # a driver without that domain
            continue
    for key in ACQUISITION_DATE_TAGS:
        value = iso_date(tags.get(key.upper()))
        if value:
            return value
    return None


def iso_date(text: str | None) -> str | None:
    """A tag's date or date-time as ISO 8601 ("2020-06-15", "2020-06-15T10:30:21.024Z"); None when it is
    not one. Accepts TIFF's "YYYY:MM:DD HH:MM:SS", ISO forms and "YYYYMMDD"; no time zone stays none."""
    m = _TAG_DATE.match((text or "").strip())
    if m is None:
        return None
    try:
        day = date(int(m["y"]), int(m["m"]), int(m["d"]))
        if m["H"] is None:
            return day.isoformat()
        when = datetime(day.year, day.month, day.day, int(m["H"]), int(m["M"]), int(m["S"] or 0))
    except ValueError:                  # "0000:00:00 00:00:00", a 13th month: not a date
        return None
    frac = (m["frac"] or "").replace(",", ".")
    tz = m["tz"] or ""
    if tz and tz.upper() != "Z" and ":" not in tz:
        tz = f"{tz[:3]}:{tz[3:]}"
    return f"{when.isoformat()}{frac}{'Z' if tz.upper() == 'Z' else tz}"


def georef_of(ds: Any) -> GeoRef | None:
    """The dataset's CRS ("EPSG:n" when it has a code, else WKT) and transform, or None when it has no CRS."""
    if ds.crs is None or ds.transform.is_identity:
        return None
    epsg = ds.crs.to_epsg()
    crs = f"EPSG:{epsg}" if epsg else ds.crs.to_wkt()
    t = ds.transform
    return GeoRef(crs=crs, transform=(t.a, t.b, t.c, t.d, t.e, t.f))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _filesystem(url: str) -> object:
    from ..store.remote import filesystem

    return filesystem(url)[0]
