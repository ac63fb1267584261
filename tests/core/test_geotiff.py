"""GeoTIFF input (SPEC 2, 10): float and integer rasters, nodata, windows, headers, and the NPZ scaling."""

from __future__ import annotations

import numpy as np
import pytest

from geotiffs import CRS, TILE_256, TRANSFORM, demo_array, to_dn, write_geotiff
from stage2 import formats, tiles
from stage2.formats import geotiff
from stage2.tiles import TileError

META = {"month": "jun", "biome_code": 4, "tile_id": "x"}


def test_float_geotiff_reads_into_the_same_tile_as_the_npz(tmp_path):
    arr = demo_array()
    np.savez(tmp_path / "a.npz", opt_v1=arr)
    (tmp_path / "a.json").write_text('{"month": "jun", "biome_code": 4, "tile_id": "x"}')
    write_geotiff(tmp_path / "b.tif", arr, meta=META)

    npz = formats.read_tile(tmp_path / "a.npz", tmp_path, input_scale=None, input_offset=None)
    tif = formats.read_tile(tmp_path / "b.tif", tmp_path, input_scale=None, input_offset=None)

    assert tif.name == "b" and tif.array.dtype == np.float32 and tif.array.shape == (4, 120, 120)
    np.testing.assert_array_equal(tif.array, npz.array)
    assert (tif.month, tif.biome, tif.meta, tif.defaults) == (npz.month, npz.biome, npz.meta, npz.defaults)
    assert tif.geo == tiles.GeoRef(CRS, TRANSFORM)
    assert npz.geo is None


def test_integer_digital_numbers_are_scaled_with_input_scale_and_offset(tmp_path):
    arr = demo_array()
    dn = to_dn(arr)
    write_geotiff(tmp_path / "dn.tif", dn)

    tile = geotiff.read_tile(tmp_path / "dn.tif", input_scale=1e-4, input_offset=-0.1)

    expected = np.clip(dn.astype(np.float64) * 1e-4 - 0.1, 0, 1)
    assert tile.array.dtype == np.float32
    np.testing.assert_allclose(tile.array, expected, atol=1e-6)
    np.testing.assert_allclose(tile.array, arr, atol=5e-5 + 1e-6)   # DN rounding: half a 1e-4 step


@pytest.mark.parametrize("suffix", [".tif", ".npz"])
def test_integers_without_input_scale_fail_with_a_hint_naming_the_keys(tmp_path, suffix):
    dn = to_dn(demo_array())
    path = tmp_path / f"dn{suffix}"
    write_geotiff(path, dn) if suffix == ".tif" else np.savez(path, opt_v1=dn)

    with pytest.raises(TileError) as e:
        formats.read_tile(path, input_scale=None, input_offset=None)

    assert "integer" in e.value.reason and "uint16" in e.value.reason
    assert "input_scale=0.0001" in e.value.hint and "input_offset=-0.1" in e.value.hint


def test_integer_npz_is_scaled_by_the_same_function(tmp_path):
    dn = to_dn(demo_array())
    np.savez(tmp_path / "dn.npz", opt_v1=dn)
    write_geotiff(tmp_path / "dn.tif", dn)

    npz = tiles.read_tile(tmp_path / "dn.npz", input_scale=1e-4, input_offset=-0.1)
    tif = geotiff.read_tile(tmp_path / "dn.tif", input_scale=1e-4, input_offset=-0.1)

    np.testing.assert_array_equal(npz.array, tif.array)


def test_float_tiles_ignore_input_scale(tmp_path):
    arr = demo_array()
    write_geotiff(tmp_path / "f.tif", arr)
    tile = geotiff.read_tile(tmp_path / "f.tif", input_scale=1e-4, input_offset=-0.1)
    np.testing.assert_array_equal(tile.array, arr)


def test_nodata_pixels_read_as_nan_and_fail_the_tile_with_their_count(tmp_path):
    dn = to_dn(demo_array())
    dn[:, :10, :20] = 0                           # 200 pixels outside the swath
    write_geotiff(tmp_path / "nd.tif", dn, nodata=0)

    with geotiff.GeoTiff(tmp_path / "nd.tif", input_scale=1e-4, input_offset=-0.1) as tif:
        assert tif.header.has_mask and tif.header.nodata == 0
        raw = tif.read()
    assert np.isnan(raw[:, :10, :20]).all()
    assert np.isfinite(raw[:, 10:]).all() and np.isfinite(raw[:, :, 20:]).all()

    with pytest.raises(TileError) as e:
        geotiff.read_tile(tmp_path / "nd.tif", input_scale=1e-4, input_offset=-0.1)
    assert e.value.reason == "200 no-data pixels (the file's nodata value 0)"
    assert "nan_policy=mask" in e.value.hint


def test_float_nodata_value_reads_as_nan(tmp_path):
    arr = demo_array().copy()
    arr[2, 5, 7] = -9999.0
    write_geotiff(tmp_path / "f.tif", arr, nodata=-9999.0)
    with geotiff.GeoTiff(tmp_path / "f.tif", input_scale=None, input_offset=None) as tif:
        raw = tif.read()
    assert np.isnan(raw[2, 5, 7]) and np.count_nonzero(np.isnan(raw)) == 1


def test_a_window_equals_the_slice_of_the_full_read(tmp_path, monkeypatch):
    arr = demo_array(TILE_256)
    write_geotiff(tmp_path / "s.tif", to_dn(arr), blocksize=64)
    with geotiff.GeoTiff(tmp_path / "s.tif", input_scale=1e-4, input_offset=-0.1) as tif:
        full = tif.read()
        window = tif.read((37, 90, 100, 150))            # crosses internal blocks on both axes
        monkeypatch.setattr(geotiff, "BLOCK_VALUES", 4 * 256 * 7)   # whole read in blocks of 7 rows
        by_blocks = tif.read()
        with pytest.raises(ValueError, match="not inside"):
            tif.read((200, 0, 100, 10))
    np.testing.assert_array_equal(window, full[:, 37:137, 90:240])
    np.testing.assert_array_equal(by_blocks, full)


def test_the_header_is_read_without_the_pixels(tmp_path):
    """A file cut after its header: peek still answers, reading the pixels fails the tile."""
    import rasterio.shutil

    plain = write_geotiff(tmp_path / "plain.tif", demo_array(TILE_256))
    full = tmp_path / "full.tif"      # GDAL's COG layout: the header first, then the pixels
    rasterio.shutil.copy(plain, full, driver="COG", BLOCKSIZE=64)
    data = full.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[:len(data) // 2])

    header = geotiff.peek(cut)
    assert header.shape == (4, 256, 256) and header.dtype == "float32"
    assert header.geo == tiles.GeoRef(CRS, TRANSFORM) and header.descriptions == ("B02", "B03", "B04", "B08")
    assert formats.peek_shape(cut) == (4, 256, 256)
    with pytest.raises(TileError, match="unreadable GeoTIFF pixels"):
        geotiff.read_tile(cut, input_scale=None, input_offset=None)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")   # writing it
def test_a_tif_without_a_crs_has_no_georeferencing(tmp_path):
    write_geotiff(tmp_path / "plain.tif", demo_array(), crs=None)
    assert geotiff.read_tile(tmp_path / "plain.tif", input_scale=None, input_offset=None).geo is None


@pytest.mark.parametrize("case, reason", [
    ("three_bands", "3 bands, expected 4"),
    ("band_order", "bands are in the order ['B04', 'B03', 'B02', 'B08']"),
    ("not_tiff", "not a readable GeoTIFF"),
    ("empty", "empty file (0 bytes)"),
])
def test_bad_geotiffs_fail_with_a_reason(tmp_path, case, reason):
    arr, path = demo_array(), tmp_path / "bad.tif"
    if case == "three_bands":
        write_geotiff(path, arr[:3], descriptions=None)
    elif case == "band_order":
        write_geotiff(path, arr[[2, 1, 0, 3]], descriptions=("B04", "B03", "B02", "B08"))
    elif case == "not_tiff":
        path.write_text("not a tiff")
    else:
        path.write_bytes(b"")
    with pytest.raises(TileError) as e:
        geotiff.read_tile(path, input_scale=None, input_offset=None)
    assert reason in e.value.reason and e.value.hint


def test_a_geotiff_reads_from_an_fsspec_url(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    write_geotiff(tmp_path / "m.tif", demo_array(TILE_256), blocksize=64)
    fsspec.filesystem("memory").pipe_file("/geotiff-test/m.tif", (tmp_path / "m.tif").read_bytes())
    with geotiff.GeoTiff("memory://geotiff-test/m.tif", input_scale=None, input_offset=None) as tif:
        assert tif.header.geo == tiles.GeoRef(CRS, TRANSFORM)
        np.testing.assert_array_equal(tif.read((10, 20, 30, 40)), demo_array(TILE_256)[:, 10:40, 20:60])


@pytest.mark.parametrize("side, expected", [
    ({"crs": 32633, "transform": list(TRANSFORM)}, tiles.GeoRef("EPSG:32633", TRANSFORM)),
    ({"crs": "EPSG:32633", "transform": [*TRANSFORM, 0, 0, 1]}, tiles.GeoRef("EPSG:32633", TRANSFORM)),
    ({"crs": "EPSG:32633"}, None),
    ({}, None),
])
def test_npz_sidecar_georeferencing(tmp_path, side, expected):
    np.savez(tmp_path / "t.npz", opt_v1=demo_array())
    (tmp_path / "t.json").write_text(__import__("json").dumps({"month": 5, **side}))
    assert tiles.read_tile(tmp_path / "t.npz").geo == expected


@pytest.mark.parametrize("side, what", [
    ({"crs": "EPSG:32633", "transform": [10, 0, 500000]}, "transform"),
    ({"crs": ["EPSG", 32633], "transform": list(TRANSFORM)}, "crs"),
])
def test_malformed_sidecar_georeferencing_fails_the_tile(tmp_path, side, what):
    np.savez(tmp_path / "t.npz", opt_v1=demo_array())
    (tmp_path / "t.json").write_text(__import__("json").dumps(side))
    with pytest.raises(TileError) as e:
        tiles.read_tile(tmp_path / "t.npz")
    assert e.value.reason.startswith(f"sidecar t.json: {what}")
