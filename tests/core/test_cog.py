"""COG output (SPEC 3, 10): valid per rio-cogeo, float32, band names, nodata NaN, georeferencing, atomic."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import rasterio
from omegaconf import OmegaConf
from rio_cogeo.cogeo import cog_validate

from geotiffs import CRS, TILE_256, TRANSFORM, demo_array, write_geotiff
from helpers import REPO
from stage2 import formats, tiles
from stage2.formats import cog
from stage2.store import open_store


@pytest.fixture
def settings():
    """The shipped `cog:` settings of conf/predict.yaml (the only home of their defaults)."""
    return cog.CogSettings(**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "predict.yaml").cog))


def refine(arr: np.ndarray) -> np.ndarray:
    """A stand-in for the model's opt_v2: full float32 precision, unlike the 1e-4 steps of the inputs."""
    return np.clip(arr + np.float32(1 / 3) * 1e-3, 0, 1).astype(np.float32)


@pytest.mark.parametrize("tile", ["ben1_20170617_4_55", "mtom_t48que_20200223_r300_c800_256x256"])
def test_geotiff_in_cog_out_keeps_values_bands_nodata_and_georeferencing(tmp_path, settings, tile):
    src = write_geotiff(tmp_path / "in" / f"{tile}.tif", demo_array(REPO / "examples/demo_aoi" / f"{tile}.npz"))
    t = formats.read_tile(src, input_scale=None, input_offset=None)
    opt_v2 = refine(t.array)

    out_dir = open_store(tmp_path / "out")
    out_dir.make()
    assert cog.write_cog(out_dir, cog.output_key(t.name), opt_v2, t.geo, settings) is True

    out = tmp_path / "out" / f"{tile}.tif"
    valid, errors, warnings = cog_validate(str(out), quiet=True)
    assert valid and not errors and not warnings
    with rasterio.open(out) as ds, rasterio.open(src) as inp:
        assert ds.count == 4 and ds.dtypes == ("float32",) * 4
        assert ds.descriptions == ("B02", "B03", "B04", "B08")
        assert [c.name for c in ds.colorinterp] == ["blue", "green", "red", "undefined"]
        assert math.isnan(ds.nodata)
        assert ds.crs == inp.crs and ds.crs.to_epsg() == 32633
        assert ds.transform == inp.transform and ds.bounds == inp.bounds
        assert ds.block_shapes == [(settings.blocksize, settings.blocksize)] * 4
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
        assert ds.compression.name == settings.compress
        np.testing.assert_allclose(ds.read(), opt_v2, rtol=0, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{tile}.tif"]   # no temporary left


def test_npz_sidecar_georeferencing_goes_into_the_cog(tmp_path, settings):
    np.savez(tmp_path / "t.npz", opt_v1=demo_array())
    (tmp_path / "t.json").write_text(json.dumps({"month": 6, "crs": "EPSG:32633", "transform": list(TRANSFORM)}))
    t = tiles.read_tile(tmp_path / "t.npz")

    assert cog.write_cog(open_store(tmp_path), "t.tif", t.array, t.geo, settings) is True

    back = cog.read_cog(tmp_path / "t.tif")
    assert back.geo == tiles.GeoRef(CRS, TRANSFORM)
    np.testing.assert_array_equal(back.array, t.array)
    assert back.descriptions == ("B02", "B03", "B04", "B08")


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")   # rio-cogeo's own open
def test_without_georeferencing_the_cog_is_written_plain_and_the_caller_told(tmp_path, settings):
    arr = demo_array()
    assert cog.write_cog(open_store(tmp_path), "plain.tif", arr, None, settings) is False
    assert cog_validate(str(tmp_path / "plain.tif"), quiet=True)[0]
    back = cog.read_cog(tmp_path / "plain.tif")
    assert back.geo is None
    np.testing.assert_array_equal(back.array, arr)


def test_nan_no_data_pixels_stay_nan(tmp_path, settings):
    arr = demo_array().copy()
    arr[:, :8, :8] = np.nan
    cog.write_cog(open_store(tmp_path), "nan.tif", arr, tiles.GeoRef(CRS, TRANSFORM), settings)
    back = cog.read_cog(tmp_path / "nan.tif").array
    assert np.isnan(back[:, :8, :8]).all() and np.count_nonzero(np.isnan(back)) == 4 * 64


def test_a_crs_gdal_does_not_know_fails_the_tile(tmp_path, settings):
    with pytest.raises(tiles.TileError, match="'EPSG:999999' is not a coordinate reference system"):
        cog.write_cog(open_store(tmp_path), "x.tif", demo_array(), tiles.GeoRef("EPSG:999999", TRANSFORM), settings)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_scenes_get_overviews_and_deflate_is_valid_too(tmp_path, settings):
    scene = np.tile(refine(demo_array(TILE_256)), (1, 4, 4))          # 1024 px
    deflate = cog.CogSettings(**{**settings.__dict__, "compress": "deflate"})
    cog.write_cog(open_store(tmp_path), "auto.tif", scene, tiles.GeoRef(CRS, TRANSFORM), settings)
    cog.write_cog(open_store(tmp_path), "two.tif", scene[:, :256, :256], None,
                  cog.CogSettings(**{**settings.__dict__, "overviews": 2}))
    cog.write_cog(open_store(tmp_path), "deflate.tif", scene, None, deflate)

    with rasterio.open(tmp_path / "auto.tif") as ds:
        assert ds.overviews(1) == [2, 4]                 # 1024 -> 512 -> 256 = one block
    with rasterio.open(tmp_path / "two.tif") as ds:
        assert ds.overviews(1) == [2, 4]
    with rasterio.open(tmp_path / "deflate.tif") as ds:
        assert ds.compression.name == "deflate" and ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
    for name in ("auto", "two", "deflate"):
        valid, errors, warnings = cog_validate(str(tmp_path / f"{name}.tif"), quiet=True)
        assert valid and not errors and not warnings, name
    # GDAL's own temporaries (overviews) went elsewhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.tif", "deflate.tif", "two.tif"]


def test_a_failed_encode_leaves_no_file(tmp_path, settings, monkeypatch):
    """Killed mid-write (here: GDAL raises after writing part of the file): no output, no temporary."""
    import rasterio.shutil

    def half_then_fail(src, dst, **kw):
        with open(dst, "wb") as f:
            f.write(b"II*\x00 part of a tiff")
        raise rasterio.errors.RasterioIOError("disk full")

    monkeypatch.setattr(rasterio.shutil, "copy", half_then_fail)
    with pytest.raises(rasterio.errors.RasterioIOError):
        cog.write_cog(open_store(tmp_path), "x.tif", demo_array(), None, settings)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, message", [
    ({"compress": "lzw"}, "cog.compress='lzw'"),
    ({"overviews": "many"}, "cog.overviews='many'"),
    ({"blocksize": 100}, "cog.blocksize=100"),
])
def test_bad_cog_settings_are_named(settings, bad, message):
    with pytest.raises(ValueError, match=message):
        cog.CogSettings(**{**settings.__dict__, **bad})
