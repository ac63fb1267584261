"""The STAC catalog of an output folder: one Collection, one Item per valid output, as plain dicts.

STAC 1.1 with the projection (v2.0.0), eo (v1.1.0), raster (v1.1.0) and processing (v1.2.0)
extensions: the versions pystac writes and the offline schemas in tests/data/stac-schemas validate.
Bands are described with `eo:bands` and `raster:bands` on the image asset (not STAC 1.1's common
`bands` array, which goes with eo/raster v2). Written without pystac, so the end of a predict run
needs nothing beyond numpy, the standard library and rasterio.

Self-contained: every link and asset href is relative (to the document that holds it), so the whole
output folder can be moved, copied or served, and `pystac.Collection.from_file` or `odc.stac.load`
still resolve it. The one absolute link is an Item's `derived_from`, to the Stage 1 input it was made
from, which lies outside the folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timezone
from functools import lru_cache
from typing import Any

import numpy as np

from .. import __version__, product
from ..store import is_url
from ..tiles import BANDS
from .layout import COLLECTION_KEY, href, item_key
from .outputs import ValidOutput

log = logging.getLogger("stage2")

STAC_VERSION = "1.1.0"
PROJECTION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
EO = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
RASTER = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
PROCESSING = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"

COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
NPZ_TYPE = "application/x-npz"      # no registered type: NumPy's .npz (a zip of .npy arrays)
JSON_TYPE = "application/json"
GEOTIFF_TYPE = "image/tiff; application=geotiff"

# opt_v2's bands as the eo extension names them (Sentinel-2A centre wavelengths, micrometres).
EO_BANDS = [{"name": band, "common_name": common, "center_wavelength": wl, "description": desc}
            for band, common, wl, desc in zip(BANDS, ("blue", "green", "red", "nir"), (0.490, 0.560, 0.665, 0.842),
                                              ("Blue (Sentinel-2 B02)", "Green (Sentinel-2 B03)",
                                               "Red (Sentinel-2 B04)", "NIR (Sentinel-2 B08)"), strict=True)]
# The Item's asset key of each COG layer (other layers keep their own name).
ASSET_KEYS = {product.OUTPUT_KEY: "opt_v2", "opt_v2_std": "std"}
# Where an output has no acquisition date: STAC needs a time range instead. Sentinel-1A's first day in
# orbit (SAR, Stage 1's input) is the earliest date a Stage 1 tile can show; its processing time the latest.
EARLIEST_ACQUISITION = "2014-04-03T00:00:00Z"
# Points per footprint edge reprojected to WGS84: a projected square's edges curve a little in
# longitude/latitude (a metre or so along a 40 km scene's edge); corners and midpoints follow that.
EDGE_POINTS = 2
DECIMALS = 7                # degrees: about 1 cm, no float noise in the files


# ---------------------------------------------------------------------------- time
def utc_text(value: datetime) -> str:
    """RFC 3339 in UTC with a `Z` (what STAC and the processing extension's pattern want)."""
    value = value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    text = value.replace(tzinfo=None).isoformat(timespec="milliseconds" if value.microsecond else "seconds")
    return f"{text}Z"


def parse_time(value: Any) -> datetime | date | None:
    """An ISO 8601 date or date-time (a `Z` accepted on Python 3.10 too); None when `value` is not one."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text[-1:] in "zZ":
        text = text[:-1] + "+00:00"
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def acquisition_times(meta: dict[str, Any]) -> dict[str, Any]:
    """`datetime` (and `start_datetime`/`end_datetime`) of an output, from its `acquired`, never its processing time.

    A date-time is the acquisition; a date alone is that whole day (UTC); an unknown date is the range
    from EARLIEST_ACQUISITION to the processing time, with `datetime` null, as STAC allows.
    """
    return dict(_times(_text(meta.get("acquired")), _text(meta.get("timestamp")))[0])


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@lru_cache(maxsize=4096)
def _times(acquired: str | None, timestamp: str | None) -> tuple[tuple[tuple[str, Any], ...], str | None]:
    """(the acquisition fields, the processing time in UTC) of an output's `acquired` and `timestamp`.
    Remembered: the outputs of a run share their timestamps, and often their dates."""
    stamp = parse_time(timestamp)
    processed = utc_text(stamp) if isinstance(stamp, datetime) else None
    when = parse_time(acquired)
    if isinstance(when, datetime):
        return (("datetime", utc_text(when)),), processed
    if isinstance(when, date):
        return (("datetime", None), ("start_datetime", f"{when.isoformat()}T00:00:00Z"),
                ("end_datetime", f"{when.isoformat()}T23:59:59Z")), processed
    end = processed or utc_text(datetime.now(timezone.utc))
    return (("datetime", None), ("start_datetime", min(EARLIEST_ACQUISITION, end)), ("end_datetime", end)), processed


# ---------------------------------------------------------------------------- footprints
def footprints(outputs: Sequence[ValidOutput]) -> dict[str, tuple[dict[str, Any], list[float]]]:
    """name -> (GeoJSON polygon, bbox) in WGS84 for each georeferenced output.

    The outline of each raster (EDGE_POINTS per edge) is reprojected in one vectorised call per CRS,
    so 10,000 outputs in one UTM zone cost one call. An outline that crosses the antimeridian is not
    split (its bbox then spans the globe's width): Stage 1 tiles are far smaller than a UTM zone.
    """
    by_crs: dict[str, list[ValidOutput]] = {}
    for o in outputs:
        if o.geo is not None:
            by_crs.setdefault(o.geo.crs, []).append(o)
    out: dict[str, tuple[dict[str, Any], list[float]]] = {}
    for crs, group in by_crs.items():
        out.update(_reproject(crs, group))
    return out


def _outline_fractions() -> tuple[np.ndarray, np.ndarray]:
    """Column and row of each outline point as fractions of the width and height (not closed): down the
    left edge from the top-left corner, along the bottom, up the right, back along the top, which is
    counter-clockwise on a north-up map, as GeoJSON's right-hand rule wants."""
    t = np.arange(EDGE_POINTS) / EDGE_POINTS
    zero, one = np.zeros(EDGE_POINTS), np.ones(EDGE_POINTS)
    return np.concatenate([zero, t, one, 1 - t]), np.concatenate([t, one, 1 - t, zero])


def _reproject(crs: str, group: list[ValidOutput]) -> dict[str, tuple[dict[str, Any], list[float]]]:
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.warp import transform

    fc, fr = _outline_fractions()
    shape = np.array([o.shape for o in group], dtype=np.float64)                       # (n, 2): H, W
    affine = np.array([o.geo.transform for o in group], dtype=np.float64)             # type: ignore[union-attr]
    cols, rows = fc[None, :] * shape[:, 1:2], fr[None, :] * shape[:, 0:1]             # (n, points)
    a, b, c, d, e, f = (affine[:, i:i + 1] for i in range(6))
    xs, ys = a * cols + b * rows + c, d * cols + e * rows + f
    try:
        lon, lat = transform(CRS.from_user_input(crs), CRS.from_epsg(4326), xs.ravel(), ys.ravel())
    except (CRSError, ValueError) as e:
        log.warning("catalog: %d outputs in CRS %.60s cannot be placed in WGS84: %s", len(group), crs, e)
        return {}
    lon = np.round(np.asarray(lon).reshape(xs.shape), DECIMALS)
    lat = np.round(np.asarray(lat).reshape(xs.shape), DECIMALS)
    ok = np.isfinite(lon).all(axis=1) & np.isfinite(lat).all(axis=1)
    rings = np.stack([lon, lat], axis=2)
    rings = np.concatenate([rings, rings[:, :1]], axis=1).tolist()                     # closed
    boxes = np.stack([lon.min(axis=1), lat.min(axis=1), lon.max(axis=1), lat.max(axis=1)], axis=1).tolist()
    return {o.name: ({"type": "Polygon", "coordinates": [ring]}, box)
            for o, ring, box, good in zip(group, rings, boxes, ok.tolist(), strict=True) if good}


# ---------------------------------------------------------------------------- items
def item(o: ValidOutput, collection_id: str, footprint: tuple[dict[str, Any], list[float]] | None) -> dict[str, Any]:
    """The STAC Item of one output: its id is the output's name."""
    key = item_key(o.name)
    placed = footprint is not None and o.geo is not None
    properties = {**acquisition_times(o.meta), **_processing(o.meta), **_stage2_properties(o.meta)}
    extensions = [EO, RASTER, PROCESSING]
    if placed:
        properties.update(_projection(o))
        extensions.insert(0, PROJECTION)
    doc: dict[str, Any] = {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": extensions,
        "id": o.name,
        "geometry": footprint[0] if placed else None,
        **({"bbox": footprint[1]} if placed else {}),
        "properties": properties,
        "links": _item_links(key, o.meta),
        "assets": _assets(o, key),
        "collection": collection_id,
    }
    return doc


def _projection(o: ValidOutput) -> dict[str, Any]:
    crs = o.geo.crs  # type: ignore[union-attr]
    code = crs if crs.upper().startswith("EPSG:") else None
    proj = {"proj:code": code} if code else {"proj:code": None, "proj:wkt2": _wkt2(crs)}
    return {**proj, "proj:shape": list(o.shape), "proj:transform": list(o.geo.transform)}  # type: ignore[union-attr]


@lru_cache(maxsize=64)
def _wkt2(crs: str) -> str:
    """A CRS without an EPSG code as WKT2 (what proj:wkt2 holds); the JSON's own text where GDAL cannot read it."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        return CRS.from_user_input(crs).to_wkt(version="WKT2_2019")
    except (CRSError, ValueError):
        return crs


def _processing(meta: dict[str, Any]) -> dict[str, Any]:
    """The processing extension's fields, and `created` (the processing time: STAC's time of the data's making)."""
    processing = meta.get("processing") if isinstance(meta.get("processing"), dict) else {}
    version = str(processing.get("stage2_version") or __version__)
    out: dict[str, Any] = {"processing:software": {"stage2": version}}
    model = processing.get("model")
    out["processing:lineage"] = (f"Stage 2 refinement of a Stage 1 tile (opt_v1 -> opt_v2) by a {model} model"
                                 if model else "Stage 2 refinement of a Stage 1 tile (opt_v1 -> opt_v2)")
    processed = _times(_text(meta.get("acquired")), _text(meta.get("timestamp")))[1]
    if processed:
        out["processing:datetime"] = out["created"] = processed
    return out


def _stage2_properties(meta: dict[str, Any]) -> dict[str, Any]:
    """The conditioning a Stage 3 model may want (month, biome) and the tile's own id, under a `stage2:` prefix."""
    out = {f"stage2:{k}": meta[k] for k in ("month", "biome_code", "tile_id")
           if isinstance(meta.get(k), (int, str)) and not isinstance(meta.get(k), bool)}
    if parse_time(_text(meta.get("acquired"))) is None:
        out["stage2:acquired_unknown"] = True
    return out


def _item_links(key: str, meta: dict[str, Any]) -> list[dict[str, Any]]:
    up = href(key, COLLECTION_KEY)
    links = [{"rel": rel, "href": up, "type": JSON_TYPE} for rel in ("root", "parent", "collection")]
    source = (meta.get("processing") or {}).get("input_file") if isinstance(meta.get("processing"), dict) else None
    if isinstance(source, str) and source:
        link = {"rel": "derived_from", "href": _absolute(source), "title": "Stage 1 input (opt_v1)"}
        kind = _media_type(source)
        if kind:
            link["type"] = kind
        links.append(link)
    return links


def _absolute(path: str) -> str:
    """A URL as it is; a local path made absolute (a relative one is relative to where the run was started)."""
    return path if path.startswith("/") or is_url(path) else os.path.abspath(path)


def _media_type(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(".npz"):
        return NPZ_TYPE
    if lower.endswith((".tif", ".tiff")):
        return GEOTIFF_TYPE
    return None


def _assets(o: ValidOutput, key: str) -> dict[str, Any]:
    assets: dict[str, Any] = {}
    for f in o.files:
        if f["format"] == "cog":
            for layer in f["layers"]:
                assets[ASSET_KEYS.get(layer, layer)] = _cog_asset(o, key, f["path"], layer)
        else:
            assets["npz"] = {"href": href(key, f["path"]), "type": NPZ_TYPE, "roles": ["data"],
                             "title": "NumPy arrays " + ", ".join(f["layers"]),
                             "description": "float32 (4, H, W) per array, bands B02, B03, B04, B08; NaN = no data"}
    assets["metadata"] = {"href": href(key, product.json_key(o.name)), "type": JSON_TYPE, "roles": ["metadata"],
                          "title": "Stage 2 output metadata"}
    return assets


def _cog_asset(o: ValidOutput, key: str, path: str, layer: str) -> dict[str, Any]:
    asset: dict[str, Any] = {"href": href(key, path), "type": COG_TYPE, "roles": ["data"]}
    resolution = _resolution(o)
    if layer == product.OUTPUT_KEY:
        asset["title"] = "Refined reflectance (opt_v2)"
        asset["eo:bands"] = EO_BANDS
        asset["raster:bands"] = [_raster_band(o.band_stats.get(b), o.shape, resolution) for b in BANDS]
    else:
        # The same bands, other values (e.g. a spread): no eo:bands, so B02 ... B08 stay opt_v2's names.
        asset["title"] = f"{layer} (per band B02, B03, B04, B08)"
        asset["raster:bands"] = [_raster_band(None, o.shape, resolution) for _ in BANDS]
    return asset


def _resolution(o: ValidOutput) -> float | None:
    if o.geo is None:
        return None
    a, b, _, d, e, _ = o.geo.transform
    if b == 0 and d == 0 and abs(a) == abs(e):
        return abs(a)
    return None


def _raster_band(stats: dict[str, Any] | None, shape: tuple[int, int], resolution: float | None) -> dict[str, Any]:
    band: dict[str, Any] = {"data_type": "float32", "nodata": "nan"}
    if resolution is not None:
        band["spatial_resolution"] = resolution
    if stats and stats.get("count"):
        band["statistics"] = {"minimum": stats["min"], "maximum": stats["max"], "mean": stats["mean"],
                              "stddev": stats["std"],
                              "valid_percent": round(100.0 * stats["count"] / (shape[0] * shape[1]), 4)}
    return band


# ---------------------------------------------------------------------------- encoding
def encode(doc: dict[str, Any], indent: int | None = None) -> bytes:
    """A document as strict JSON (no NaN): an Item compact, the collection indented."""
    separators = (",", ":") if indent is None else (",", ": ")
    text = json.dumps(doc, indent=indent, separators=separators, ensure_ascii=False, allow_nan=False,
                      check_circular=False)
    return (text + "\n").encode("utf-8")


# ---------------------------------------------------------------------------- the collection
def collection(collection_id: str, title: str, items: Iterable[dict[str, Any]], input_dir: str | None,
               ) -> dict[str, Any]:
    """The Collection that links every Item, with the union of their footprints and acquisition times."""
    items = list(items)
    boxes = [it["bbox"] for it in items if "bbox" in it]
    spatial = ([min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                max(b[3] for b in boxes)] if boxes else [-180.0, -90.0, 180.0, 90.0])
    starts = [it["properties"].get("datetime") or it["properties"].get("start_datetime") for it in items]
    ends = [it["properties"].get("datetime") or it["properties"].get("end_datetime") for it in items]
    interval = [min(s for s in starts if s) if any(starts) else None, max(e for e in ends if e) if any(ends) else None]
    links: list[dict[str, Any]] = [{"rel": "root", "href": "./collection.json", "type": JSON_TYPE,
                                    "title": title}]
    links += [{"rel": "item", "href": href(COLLECTION_KEY, item_key(it["id"])), "type": "application/geo+json"}
              for it in items]
    if input_dir:
        links.append({"rel": "derived_from", "href": _absolute(input_dir), "title": "Stage 1 tiles (opt_v1)"})
    return {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": [PROCESSING],
        "id": collection_id,
        "title": title,
        "description": ("Stage 2 refined Sentinel-2-like tiles (opt_v2: reflectance in [0, 1], bands B02, B03, "
                        "B04, B08, NaN = no data), one Item per output of the folder. Items without a place on "
                        "the map have a null geometry; the spatial extent then covers the globe."),
        "license": "other",
        "providers": [{"name": "stage2", "roles": ["processor"],
                       "processing:software": {"stage2": __version__}}],
        "extent": {"spatial": {"bbox": [spatial]}, "temporal": {"interval": [interval]}},
        "links": links,
    }
