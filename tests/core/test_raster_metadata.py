"""Metadata that travels with the rasters: the COG's dataset and band tags, and a GeoTIFF input's
acquisition date read from its own tags when its sidecar has none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from geotiffs import CRS, TRANSFORM, demo_array, write_geotiff
from handoff_helpers import cog_settings
from stage2 import formats, product
from stage2.formats import cog, geotiff
from stage2.store import open_store
from stage2.tiles import GeoRef


def test_the_cog_carries_the_tiles_metadata_and_names_its_bands(tmp_path):
    meta = {"tile_id": "x", "month": 6, "biome_code": 4, "acquired": "2020-06-15", "stage": "stage2_refined",
            "processing": {"model": "prithvi_eo_tiny", "precision": "32-true", "checkpoint_sha256": "ab" * 32,
                           "stage2_version": "0.1.0", "device": "cpu"}}
    tags = product.cog_tags(meta)
    cog.write_cog(open_store(tmp_path), "x.tif", demo_array(), GeoRef(CRS, TRANSFORM), cog_settings(), tags=tags)

    with rasterio.open(tmp_path / "x.tif") as ds:
        got = ds.tags()
        assert {k: got[k] for k in tags} == {"tile_id": "x", "month": "6", "biome_code": "4", "acquired": "2020-06-15",
                                             "stage": "stage2_refined", "model": "prithvi_eo_tiny",
                                             "precision": "32-true", "checkpoint_sha256": "ab" * 32,
                                             "stage2_version": "0.1.0"}
        assert ds.descriptions == ("B02", "B03", "B04", "B08")
        assert [ds.tags(i)["common_name"] for i in range(1, 5)] == ["blue", "green", "red", "nir"]
        assert [float(ds.tags(i)["center_wavelength_um"]) for i in range(1, 5)] == [0.490, 0.560, 0.665, 0.842]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_band_tags_are_written_without_dataset_tags_and_for_any_four_band_layer(tmp_path):
    spread = np.full((4, 32, 32), 0.01, dtype=np.float32)            # a per-pixel std has the same 4 bands
    cog.write_cog(open_store(tmp_path), "s.std.tif", spread, None, cog_settings())
    with rasterio.open(tmp_path / "s.std.tif") as ds:
        assert ds.tags(1)["common_name"] == "blue" and ds.descriptions[3] == "B08"
    with pytest.raises(ValueError, match=r"\(4, H, W\)"):
        cog.write_cog(open_store(tmp_path), "three.tif", spread[:3], None, cog_settings())


def test_a_cog_output_read_back_as_input_keeps_its_acquisition_date(tmp_path):
    cog.write_cog(open_store(tmp_path), "back.tif", demo_array(), GeoRef(CRS, TRANSFORM), cog_settings(),
                  tags={"acquired": "2021-03-04T10:00:00Z"})
    tile = formats.read_tile(tmp_path / "back.tif", tmp_path, input_scale=None, input_offset=None)
    assert tile.meta["acquired"] == "2021-03-04T10:00:00Z"


def _with_tags(path, **tags):
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(**tags)
    return path


@pytest.mark.parametrize("tags, acquired", [
    ({"TIFFTAG_DATETIME": "2020:06:15 10:30:00"}, "2020-06-15T10:30:00"),
    ({"ACQUISITIONDATETIME": "2019-08-01T09:59:01.5Z"}, "2019-08-01T09:59:01.5Z"),
    ({"DATATAKE_1_DATATAKE_SENSING_START": "2018-05-02T10:20:31.024Z", "TIFFTAG_DATETIME": "2024:01:01 00:00:00"},
     "2018-05-02T10:20:31.024Z"),                                       # the sensing time wins over the file's
    ({"DATE_ACQUIRED": "2017-07-07"}, "2017-07-07"),
    ({"acquisition_date": "20160102"}, "2016-01-02"),                   # any letter case, a compact date
    ({"TIFFTAG_DATETIME": "0000:00:00 00:00:00"}, None),                # a placeholder, not a date
    ({}, None),
])
def test_a_geotiffs_acquisition_date_comes_from_its_tags(tmp_path, tags, acquired):
    path = _with_tags(write_geotiff(tmp_path / "t.tif", demo_array()), **tags)
    tile = formats.read_tile(path, tmp_path, input_scale=None, input_offset=None)
    assert tile.meta.get("acquired") == acquired
    assert geotiff.peek(path).acquired == acquired


def test_the_sidecars_acquisition_date_wins_over_the_tags(tmp_path):
    path = _with_tags(write_geotiff(tmp_path / "t.tif", demo_array()), TIFFTAG_DATETIME="2020:06:15 10:30:00")
    (tmp_path / "t.json").write_text(json.dumps({"acquired": "2020-06-14"}))
    assert formats.read_tile(path, tmp_path, input_scale=None, input_offset=None).meta["acquired"] == "2020-06-14"
    (tmp_path / "t.json").write_text(json.dumps({"acquired": None}))       # null: as if it had none
    assert formats.read_tile(path, tmp_path, input_scale=None, input_offset=None).meta["acquired"] == \
        "2020-06-15T10:30:00"


@pytest.mark.parametrize("text, iso", [
    ("2020:06:15 10:30:00", "2020-06-15T10:30:00"),
    ("2020-06-15T10:30:00+0200", "2020-06-15T10:30:00+02:00"),
    ("2020-06-15 10:30", "2020-06-15T10:30:00"),
    ("2020-02-30", None),
    ("yesterday", None),
    (None, None),
])
def test_tag_dates_become_iso_8601(text, iso):
    assert geotiff.iso_date(text) == iso
