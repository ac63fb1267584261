"""Output folders for the hand-off tests (importable as `handoff_helpers`: pytest's pythonpath = tests).

Outputs are written by stage2's own writer (stage2.product.write_output, the COG through
stage2.formats.cog), or as an earlier stage2 wrote them (no schema keys in the JSON), and a STAC
validator that works offline from the schemas in tests/data/stac-schemas.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from helpers import REPO

CRS = "EPSG:32633"
SCHEMAS = REPO / "tests" / "data" / "stac-schemas"
STAGE2_KEYS = {"stage": "stage2_refined", "timestamp": "2025-06-01T14:00:00+02:00", "metadata_defaults": []}


def cog_settings() -> Any:
    """The shipped `cog:` settings of conf/predict.yaml."""
    from stage2.formats import cog

    return cog.CogSettings(**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "predict.yaml").cog))


def refined(seed: int, h: int = 48, w: int = 64, nan_rows: int = 0) -> np.ndarray:
    """A stand-in opt_v2: float32 (4, H, W) in [0, 1], its first `nan_rows` rows no data (NaN)."""
    rng = np.random.default_rng(seed)
    arr = rng.uniform(0.02, 0.6, (4, h, w)).astype(np.float32) * np.float32([0.5, 0.6, 0.7, 1.4])[:, None, None]
    arr = np.clip(arr, 0, 1)
    arr[:, :nan_rows] = np.nan
    return arr


def transform_at(col: int, row: int, pixel: float = 10.0) -> list[float]:
    """A 10 m north-up grid whose top-left corner lies `col`, `row` pixels from (500000, 5000000) in UTM 33N."""
    return [pixel, 0.0, 500000.0 + pixel * col, 0.0, -pixel, 5000000.0 - pixel * row]


def meta_of(name: str, *, transform: list[float] | None = None, acquired: str | None = "2020-06-15T10:30:00Z",
            input_dir: str = "/data/stage1", **extra: Any) -> dict[str, Any]:
    """An output's JSON as predict makes it (before write_output adds the product keys)."""
    meta: dict[str, Any] = {"month": 6, "biome_code": 4, "tile_id": name, **extra}
    if acquired is not None:
        meta["acquired"] = acquired
    if transform is not None:
        meta.update(crs=CRS, transform=transform)
    meta.update(STAGE2_KEYS)
    meta["processing"] = {"input_file": f"{input_dir}/{name}.npz", "checkpoint": "/ckpt/tiny.pt",
                          "checkpoint_sha256": "ab" * 32, "model": "prithvi_eo_tiny", "precision": "32-true",
                          "stage2_version": "0.1.0"}
    return meta


def write_output(folder: Path, name: str, arr: np.ndarray, meta: dict[str, Any], output_format: str = "cog") -> None:
    """One output as this stage2 writes it (data files, then the JSON with schema_version, shape, files, band_stats)."""
    from stage2 import product
    from stage2.tiles import georef_from_sidecar

    folder.mkdir(parents=True, exist_ok=True)
    geo = georef_from_sidecar(meta, f"{name}.json")
    product.write_output(folder, name, {"opt_v2": arr}, meta, output_format=output_format, geo=geo,
                         cog_settings=cog_settings())


def write_legacy_output(folder: Path, name: str, arr: np.ndarray, meta: dict[str, Any], output_format: str) -> None:
    """One output as an earlier stage2 wrote it: no schema keys in the JSON, and a GeoTIFF input's
    georeference in the COG only (its JSON then has no crs or transform)."""
    from stage2.formats import cog
    from stage2.store import open_store
    from stage2.tiles import georef_from_sidecar

    folder.mkdir(parents=True, exist_ok=True)
    geo = georef_from_sidecar(meta, f"{name}.json")
    if output_format in ("npz", "both"):
        np.savez(folder / f"{name}.npz", opt_v2=arr)
    if output_format in ("cog", "both"):
        cog.write_cog(open_store(folder), f"{name}.tif", arr, geo, cog_settings())
    legacy = {k: v for k, v in meta.items() if k not in ("crs", "transform")} if output_format == "cog" else meta
    (folder / f"{name}.json").write_text(json.dumps(legacy, indent=2))


def pooled(arrays: list[np.ndarray]) -> dict[str, dict[str, Any]]:
    """The reference band statistics of every valid pixel of `arrays`, straight from the pixels."""
    out = {}
    for i, band in enumerate(("B02", "B03", "B04", "B08")):
        values = np.concatenate([a[i].ravel() for a in arrays]).astype(np.float64)
        values = values[~np.isnan(values)]
        out[band] = {"count": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
                     "min": float(values.min()), "max": float(values.max())}
    return out


@contextmanager
def offline_stac_validation() -> Iterator[None]:
    """pystac validates against the core schemas it ships and the extension schemas of tests/data, and
    any attempt to fetch a document from the web fails the test (nothing may download)."""
    import pystac
    from pystac.stac_io import DefaultStacIO
    from pystac.validation import JsonSchemaSTACValidator, RegisteredValidator, set_validator

    class OfflineStacIO(DefaultStacIO):
        def read_text_from_href(self, href: str) -> str:
            if href.startswith(("http://", "https://")):
                raise AssertionError(f"pystac tried to download {href}")
            return super().read_text_from_href(href)

    validator = JsonSchemaSTACValidator()
    for schema in sorted(SCHEMAS.glob("*/v*/schema.json")):
        name, version = schema.parent.parent.name, schema.parent.name
        validator.schema_cache[f"https://stac-extensions.github.io/{name}/{version}/schema.json"] = \
            json.loads(schema.read_text(encoding="utf-8"))
    before_validator = RegisteredValidator._validator
    before_io = pystac.StacIO._default_io
    set_validator(validator)
    pystac.StacIO.set_default(OfflineStacIO)
    try:
        yield
    finally:
        RegisteredValidator._validator = before_validator
        pystac.StacIO._default_io = before_io
