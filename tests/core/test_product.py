"""The output contract (stage2.product): files per format, the JSON, the one writer and the one reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geotiffs import CRS, TRANSFORM
from helpers import read_opt_v2, write_npz_output
from stage2 import product, read_output
from stage2.formats.cog import CogSettings
from stage2.store import LocalStore
from stage2.tiles import GeoRef, TileError

COG = CogSettings(compress="zstd", level=1, blocksize=256, overviews="auto", resampling="average")


def test_write_is_complete_and_leaves_no_temporaries(tmp_path):
    out = np.random.default_rng(0).random((4, 120, 120), dtype=np.float32)
    meta = {"month": 6, "stage": "stage2_refined", "tile_id": "../../evil"}
    write_npz_output(tmp_path, "tile_0001", out, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tile_0001.json", "tile_0001.npz"]
    assert product.is_done({p.name for p in tmp_path.iterdir()}, "tile_0001", "npz")
    np.testing.assert_array_equal(read_opt_v2(tmp_path / "tile_0001.npz"), out)
    written = json.loads((tmp_path / "tile_0001.json").read_text())
    assert {k: written[k] for k in meta} == meta
    assert (written["schema_version"], written["shape"]) == (product.SCHEMA_VERSION, [120, 120])
    assert written["files"] == [{"path": "tile_0001.npz", "format": "npz", "layers": ["opt_v2"]}]



def test_stage1_keys_are_kept_under_stage1_and_the_json_is_strict(tmp_path):
    meta = {"month": 6, "biome_code": 2, "stage": "stage1_translated", "timestamp": "2024-01-01T00:00:00Z",
            "processing": {"model": "terramind", "loss": float("nan")}, "quality": {"psnr": 31.0},
            "metadata_defaults": ["biome_code"], "stage1": {"note": "theirs"}, "tile_id": "x"}
    out = product.output_metadata(meta, processing={"checkpoint": "c.pt", "t": float("inf")}, defaults=[],
                          quality={"ndvi_rmse": 0.01}, timestamp="2025-01-01T00:00:00+00:00")
    assert out["stage1"] == {"stage": "stage1_translated", "timestamp": "2024-01-01T00:00:00Z",
                             "processing": {"model": "terramind", "loss": None}, "quality": {"psnr": 31.0},
                             "metadata_defaults": ["biome_code"], "stage1": {"note": "theirs"}}
    assert (out["stage"], out["processing"], out["quality"], out["metadata_defaults"]) == (
        "stage2_refined", {"checkpoint": "c.pt", "t": None}, {"ndvi_rmse": 0.01}, [])
    assert out["tile_id"] == "x" and out["month"] == 6
    write_npz_output(tmp_path, "t", np.zeros((4, 16, 16), np.float32), out)
    json.loads((tmp_path / "t.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    plain = product.output_metadata({"month": 6, "stage1": "kept as is"}, processing={}, defaults=["month"],
                                    quality=None, timestamp="now")
    assert plain["stage1"] == "kept as is" and "quality" not in plain


def test_a_write_that_cannot_encode_its_json_leaves_no_orphan_npz(tmp_path):
    with pytest.raises(ValueError):
        write_npz_output(tmp_path, "t", np.zeros((4, 16, 16), np.float32), {"bad": float("nan")})
    assert list(tmp_path.iterdir()) == []



@pytest.mark.parametrize("output_format, files", [
    ("npz", ["t.npz", "t.json"]),
    ("cog", ["t.tif", "t.json"]),
    ("both", ["t.npz", "t.tif", "t.json"]),
])
def test_output_files_json_last_and_done_only_when_all_are_listed(output_format, files):
    assert product.output_keys("t", output_format) == files
    assert product.is_done(set(files), "t", output_format)
    assert not product.is_done(set(files[1:]), "t", output_format)
    assert not product.is_done({"t.json"}, "t", output_format)


def test_unknown_output_format_is_named():
    with pytest.raises(ValueError, match="output_format='tiff'"):
        product.output_keys("t", "tiff")



def test_an_interrupt_right_after_the_json_rename_leaves_no_json_without_its_data(tmp_path, monkeypatch):
    """SIGINT/SIGTERM raise wherever Python is: after the JSON is in place but before write_output
    returns, the tile must leave nothing a rerun or a reader would take for a finished output."""
    from stage2.formats import cog

    real = LocalStore.write_bytes

    def write_then_interrupt(self, key, data):
        real(self, key, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalStore, "write_bytes", write_then_interrupt)
    arr = np.full((4, 16, 16), 0.5, np.float32)
    with pytest.raises(KeyboardInterrupt):
        product.write_output(tmp_path, "t0", {"opt_v2": arr}, {"tile_id": "t0"}, output_format="npz", geo=None,
                     cog_settings=cog.CogSettings(compress="zstd", level=1, blocksize=256,
                                                   overviews="auto", resampling="average"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _field(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.01, 0.6, (4, h, w)).astype(np.float32)


@pytest.mark.parametrize("output_format", ["npz", "cog", "both"])
def test_read_output_gives_layers_metadata_and_georef_for_every_format(tmp_path, output_format):
    arr = _field()
    meta = {"tile_id": "x", "month": 4, "crs": CRS, "transform": list(TRANSFORM)}
    geo = GeoRef(CRS, tuple(TRANSFORM))
    product.write_output(tmp_path, "x", {"opt_v2": arr}, meta, output_format=output_format, geo=geo, cog_settings=COG)
    for given in ("x.json", "x", *(f.key for f in product.data_files("x", output_format))):
        layers, metadata, georef = read_output(tmp_path / given)
        assert list(layers) == ["opt_v2"] and layers["opt_v2"].dtype == np.float32
        np.testing.assert_array_equal(layers["opt_v2"], arr)
        assert metadata["tile_id"] == "x" and metadata["schema_version"] == product.SCHEMA_VERSION
        assert georef is not None and georef.transform == tuple(float(v) for v in TRANSFORM)
        assert georef.crs == CRS


def test_read_output_of_an_unplaced_npz_has_no_georef_and_names_a_missing_file(tmp_path):
    write_npz_output(tmp_path, "a", _field(), {"tile_id": "a"})
    assert read_output(tmp_path / "a.npz").georef is None
    with pytest.raises(TileError, match="no output data file"):
        read_output(tmp_path / "b.json")
    np.savez(tmp_path / "c.npz", opt_v1=_field())
    with pytest.raises(TileError, match="c.npz has no 'opt_v2' array"):
        read_output(tmp_path / "c.npz")


def test_read_output_from_a_bucket(tmp_path):
    """memory:// is fsspec's in-process object store: the same reader as for a local folder."""
    from stage2.store import open_store

    arr = _field(seed=3)
    store = open_store("memory://stage2-product-test/run")
    product.write_output(store, "sub/t", {"opt_v2": arr}, {"month": 2}, output_format="both", geo=None,
                         cog_settings=COG)
    for suffix in (".npz", ".tif", ".json"):
        layers, meta, georef = read_output(f"memory://stage2-product-test/run/sub/t{suffix}")
        np.testing.assert_array_equal(layers["opt_v2"], arr)
        assert meta["month"] == 2 and georef is None


@pytest.mark.parametrize("shape", [(40, 56), (256, 256), (17, 23)])
def test_band_stats_are_exact_and_skip_no_data(shape):
    arr = _field(*shape, seed=5)
    arr[:, :7, :] = np.nan
    stats = product.band_stats(arr)
    for band, values in zip(("B02", "B03", "B04", "B08"), arr, strict=True):
        valid = values[~np.isnan(values)].astype(np.float64)
        s = stats[band]
        assert s["count"] == valid.size == (shape[0] - 7) * shape[1]
        assert s["mean"] == pytest.approx(valid.mean(), rel=1e-7)      # float32 runs, float64 across them
        assert s["std"] == pytest.approx(valid.std(), rel=1e-6)
        assert (s["min"], s["max"]) == (float(valid.min()), float(valid.max()))
    clean = product.band_stats(_field(*shape, seed=6))
    assert clean["B08"]["count"] == shape[0] * shape[1]
    empty = product.band_stats(np.full((4, 16, 16), np.nan, np.float32))
    assert empty["B02"] == {"count": 0, "mean": None, "std": None, "min": None, "max": None}
