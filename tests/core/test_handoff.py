"""The hand-off files (stage2.handoff.rebuild): the tile list, the exact band statistics, the TerraTorch
datamodule file and the STAC catalog, from the valid outputs of a folder of any stage2 version."""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from handoff_helpers import (
    meta_of,
    offline_stac_validation,
    pooled,
    refined,
    transform_at,
    write_legacy_output,
    write_output,
)
from stage2 import product
from stage2.handoff import COLLECTION_KEY, TERRATORCH_FILE, TILES_FILE, aggregate_band_stats, item_key, rebuild
from stage2.handoff import stac as stac_docs
from stage2.handoff.layout import href
from stage2.handoff.terratorch import IMG_GREP

BANDS = ("B02", "B03", "B04", "B08")


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Three georeferenced outputs as this stage2 writes them: COG, COG + NPZ (with a NaN no-data strip),
    COG; one acquired on a date only, one of unknown date."""
    out = tmp_path / "out"
    arrays = {"a": refined(0), "b": refined(1, nan_rows=6), "c": refined(2, h=40, w=40)}
    write_output(out, "a", arrays["a"], meta_of("a", transform=transform_at(0, 0)))
    write_output(out, "b", arrays["b"], meta_of("b", transform=transform_at(64, 0), acquired="2020-06-16"), "both")
    write_output(out, "c", arrays["c"], meta_of("c", transform=transform_at(0, 48), acquired=None))
    return out, arrays


def assert_stats_equal(got: dict, want: dict) -> None:
    """Per-tile sums run in float32 within runs of 256 values (product.band_stats): 1e-8 relative."""
    for band in BANDS:
        assert got[band]["count"] == want[band]["count"]
        assert got[band]["min"] == want[band]["min"] and got[band]["max"] == want[band]["max"]
        assert math.isclose(got[band]["mean"], want[band]["mean"], rel_tol=1e-7)
        assert math.isclose(got[band]["std"], want[band]["std"], rel_tol=1e-6)


# ---------------------------------------------------------------------------- tile list and statistics
def test_the_tile_list_and_the_statistics_equal_what_the_arrays_give(folder):
    out, arrays = folder
    result = rebuild(out)

    assert (out / TILES_FILE).read_text() == "a\nb\nc\n"
    assert result.tiles == result.outputs == ["a", "b", "c"]
    assert_stats_equal(result.band_stats, pooled(list(arrays.values())))
    assert result.band_stats["B02"]["count"] == 48 * 64 * 2 - 6 * 64 + 40 * 40       # the NaN strip is not data
    assert result.georeferenced == 3 and result.derived == 0 and not result.skipped
    assert result.summary()["band_stats"] == result.band_stats


def test_the_aggregate_pools_per_output_statistics_exactly():
    rng = np.random.default_rng(7)
    parts = [rng.normal(0.3 + 0.1 * i, 0.05 * (i + 1), (4, 10 + 7 * i, 13)).astype(np.float32) for i in range(6)]
    parts[2][1] = np.nan                        # a band without one valid pixel in one output
    assert_stats_equal(aggregate_band_stats([product.band_stats(p) for p in parts]), pooled(parts))
    assert aggregate_band_stats([])["B03"] == {"count": 0, "mean": None, "std": None, "min": None, "max": None}


# ---------------------------------------------------------------------------- the TerraTorch file
def test_the_terratorch_file_has_only_keys_the_installed_datamodule_takes(folder):
    import inspect

    from terratorch.datamodules import GenericNonGeoSegmentationDataModule

    out, arrays = folder
    result = rebuild(out)
    doc = yaml.safe_load((out / TERRATORCH_FILE).read_text())
    args = doc["init_args"]

    assert result.terratorch and doc["class_path"] == "terratorch.datamodules.GenericNonGeoSegmentationDataModule"
    assert set(args) <= set(inspect.signature(GenericNonGeoSegmentationDataModule).parameters)
    root = str(out.resolve())
    assert {args[k] for k in ("train_data_root", "val_data_root", "test_data_root", "predict_data_root")} == {root}
    assert {args[k] for k in ("train_split", "val_split", "test_split")} == {os.path.join(root, TILES_FILE)}
    assert args["dataset_bands"] == args["output_bands"] == ["BLUE", "GREEN", "RED", "NIR_NARROW"]
    assert args["rgb_indices"] == [2, 1, 0] and args["no_data_replace"] == 0 and args["no_label_replace"] == -1
    want = pooled(list(arrays.values()))
    np.testing.assert_allclose(args["means"], [want[b]["mean"] for b in BANDS], rtol=1e-7)
    np.testing.assert_allclose(args["stds"], [want[b]["std"] for b in BANDS], rtol=1e-6)
    for placeholder in ("num_classes", "batch_size", "train_label_data_root", "label_grep"):
        assert f"# {placeholder}:" in (out / TERRATORCH_FILE).read_text()


def test_img_grep_and_the_split_file_pick_exactly_the_refined_images(folder):
    """TerraTorch's own glob and split filter, with the file's settings: a tile's `<name>.std.tif` (its
    spread), a name that contains another (`ab` beside `a`) and the run's own files stay out."""
    from terratorch.datasets.utils import filter_valid_files

    out, _ = folder
    write_output(out, "ab", refined(3), meta_of("ab", transform=transform_at(64, 48)))
    for name in ("a", "b"):
        (out / f"{name}.std.tif").write_bytes((out / f"{name}.tif").read_bytes())
    rebuild(out)
    args = yaml.safe_load((out / TERRATORCH_FILE).read_text())["init_args"]

    found = sorted(glob.glob(os.path.join(args["train_data_root"], args["img_grep"])))
    split = {line.strip() for line in Path(args["train_split"]).read_text().splitlines()}
    picked = filter_valid_files(found, valid_files=split, ignore_extensions=args["ignore_split_file_extensions"],
                                allow_substring=args["allow_substring_split_file"])
    assert [Path(p).name for p in picked] == ["a.tif", "ab.tif", "b.tif", "c.tif"]
    assert "a.std.tif" in {Path(p).name for p in found}            # the glob alone is not enough ...
    assert "predict_data_root" not in args                         # ... so predict (no split file) gets no root
    assert "# predict_data_root:" in (out / TERRATORCH_FILE).read_text()
    assert IMG_GREP == "*.tif"


def test_an_npz_only_folder_lists_every_output_and_has_no_terratorch_file(tmp_path):
    out = tmp_path / "out"
    write_output(out, "a", refined(0), meta_of("a", transform=transform_at(0, 0)))
    (out / TERRATORCH_FILE).write_text("stale")
    for name in ("x", "y"):
        write_output(out, name, refined(5), meta_of(name), "npz")
    (out / "a.tif").unlink()
    (out / "a.json").unlink()

    result = rebuild(out)
    assert (out / TILES_FILE).read_text() == "x\ny\n"
    assert not result.terratorch and not (out / TERRATORCH_FILE).exists()
    assert any("NPZ only" in n for n in result.notes)
    items = sorted(p.name for p in (out / "_stage2_stac" / "items").iterdir())
    assert items == ["x.json", "y.json"]


def test_a_mixed_folder_lists_the_cog_outputs_and_says_which_are_left_out(folder):
    out, arrays = folder
    write_output(out, "n", refined(9), meta_of("n"), "npz")
    result = rebuild(out)
    assert result.tiles == ["a", "b", "c"] and result.outputs == ["a", "b", "c", "n"]
    assert any(n.startswith("1 outputs have no COG") for n in result.notes)
    args = yaml.safe_load((out / TERRATORCH_FILE).read_text())["init_args"]
    np.testing.assert_allclose(args["means"], [pooled(list(arrays.values()))[b]["mean"] for b in BANDS])


def test_names_terratorch_cannot_match_are_named(tmp_path):
    out = tmp_path / "out"
    write_output(out, "v1.5", refined(0), meta_of("v1.5", transform=transform_at(0, 0)))
    write_output(out, "ok", refined(1), meta_of("ok", transform=transform_at(64, 0)))
    result = rebuild(out)
    assert result.tiles == ["ok", "v1.5"]
    assert any("cannot be matched by TerraTorch" in n and "v1.5" in n for n in result.notes)
    assert "1 of the 2 listed images" in (out / TERRATORCH_FILE).read_text()


# ---------------------------------------------------------------------------- the STAC catalog
def test_the_collection_and_every_item_validate_offline(folder):
    import pystac

    out, _ = folder
    rebuild(out, input_dir="/data/stage1")
    with offline_stac_validation():
        collection = pystac.Collection.from_file(str(out / COLLECTION_KEY))
        assert collection.validate_all() == 3
        items = {it.id: it for it in collection.get_items()}
        for it in items.values():
            assert it.validate()
    assert sorted(items) == ["a", "b", "c"]
    assert collection.get_single_link("derived_from").href == "/data/stage1"


def test_items_carry_the_grid_footprint_bands_and_acquisition_time(folder):
    import pystac
    from rasterio.warp import transform_bounds

    out, arrays = folder
    rebuild(out)
    collection = pystac.Collection.from_file(str(out / COLLECTION_KEY))
    a, b, c = (collection.get_item(n) for n in "abc")

    assert a.properties["proj:code"] == "EPSG:32633" and a.properties["proj:shape"] == [48, 64]
    assert a.properties["proj:transform"] == transform_at(0, 0)
    west, south, east, north = transform_bounds("EPSG:32633", "EPSG:4326", 500000, 5000000 - 480, 500640, 5000000)
    assert a.bbox == pytest.approx([west, south, east, north], abs=1e-6)
    assert a.datetime.isoformat() == "2020-06-15T10:30:00+00:00"
    assert a.properties["created"] == a.properties["processing:datetime"] == "2025-06-01T12:00:00Z"
    assert a.properties["processing:software"] == {"stage2": "0.1.0"}
    assert b.datetime is None and b.properties["start_datetime"] == "2020-06-16T00:00:00Z"
    assert b.properties["end_datetime"] == "2020-06-16T23:59:59Z"
    assert c.datetime is None and c.properties["end_datetime"] == "2025-06-01T12:00:00Z"    # not after processing
    assert c.properties["stage2:acquired_unknown"] is True

    image = b.assets["opt_v2"]
    assert image.media_type == "image/tiff; application=geotiff; profile=cloud-optimized" and image.roles == ["data"]
    assert [band["name"] for band in image.extra_fields["eo:bands"]] == list(BANDS)
    stats = image.extra_fields["raster:bands"][0]
    assert stats["nodata"] == "nan" and stats["data_type"] == "float32"
    assert stats["statistics"]["valid_percent"] == pytest.approx(100 * (48 - 6) / 48)
    assert b.assets["npz"].roles == ["data"] and b.assets["metadata"].roles == ["metadata"]
    for asset in (*a.assets.values(), *b.assets.values()):             # relative, and pointing at the files
        assert not os.path.isabs(asset.href) and Path(asset.get_absolute_href()).is_file()
    assert a.get_single_link("derived_from").href == "/data/stage1/a.npz"
    back = json.loads((out / item_key("a")).read_text())
    assert back["links"][0] == {"rel": "root", "href": "../collection.json", "type": "application/json"}

    extent = collection.extent
    boxes = np.array([i.bbox for i in (a, b, c)])
    union = [*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0)]
    assert extent.spatial.bboxes[0] == pytest.approx(union)
    start, end = extent.temporal.intervals[0]
    assert start.isoformat() == "2014-04-03T00:00:00+00:00" and end.isoformat() == "2025-06-01T12:00:00+00:00"


def test_the_folder_can_be_moved_and_still_resolves(folder, tmp_path):
    import pystac

    out, _ = folder
    rebuild(out)
    moved = tmp_path / "elsewhere" / "copy"
    moved.parent.mkdir()
    out.rename(moved)
    collection = pystac.Collection.from_file(str(moved / COLLECTION_KEY))
    item = collection.get_item("a")
    assert Path(item.assets["opt_v2"].get_absolute_href()) == moved / "a.tif"


def test_an_output_without_georeference_has_a_null_geometry(tmp_path):
    import pystac

    out = tmp_path / "out"
    write_output(out, "plain", refined(0), meta_of("plain"))
    result = rebuild(out)
    with offline_stac_validation():
        collection = pystac.Collection.from_file(str(out / COLLECTION_KEY))
        assert collection.validate_all() == 1
    item = collection.get_item("plain")
    assert item.geometry is None and item.bbox is None and "proj:code" not in item.properties
    assert collection.extent.spatial.bboxes[0] == [-180.0, -90.0, 180.0, 90.0]
    assert result.georeferenced == 0 and result.tiles == ["plain"]


def test_a_deleted_output_disappears_from_every_file_after_a_rebuild(folder):
    import pystac

    out, arrays = folder
    rebuild(out)
    for suffix in (".json", ".tif", ".npz"):
        (out / f"b{suffix}").unlink()
    result = rebuild(out)

    assert (out / TILES_FILE).read_text() == "a\nc\n"
    assert not (out / item_key("b")).exists() and result.deleted == [item_key("b")]
    collection = pystac.Collection.from_file(str(out / COLLECTION_KEY))
    assert sorted(i.id for i in collection.get_items()) == ["a", "c"]
    assert_stats_equal(result.band_stats, pooled([arrays["a"], arrays["c"]]))


def test_outputs_that_cannot_be_trusted_are_left_out_and_named(folder):
    out, _ = folder
    (out / "c.tif").write_bytes(b"")                                     # cut short: 0 bytes
    (out / "a.tif").unlink()                                            # its data file gone
    (out / "notes.json").write_text('{"stage": "my notes"}')            # not a Stage 2 output: ignored
    (out / "broken.json").write_text("{not json")
    (out / "_stage2_summary.json").write_text(json.dumps({"stage": "stage2_refined"}))
    result = rebuild(out)

    assert result.outputs == ["b"] and (out / TILES_FILE).read_text() == "b\n"
    assert set(result.skipped) == {"a", "c"}
    assert "a.tif is missing" in result.skipped["a"] and "empty" in result.skipped["c"]


def test_items_already_in_place_are_not_written_again(folder):
    out, _ = folder
    first = rebuild(out)
    stamp = (out / item_key("a")).stat().st_mtime_ns
    again = rebuild(out)
    assert item_key("a") in first.written and item_key("a") not in again.written and again.unchanged == 3
    assert (out / item_key("a")).stat().st_mtime_ns == stamp
    assert (out / item_key("a")).read_bytes() == stac_docs.encode(json.loads((out / item_key("a")).read_text()))


def test_outputs_of_sub_folders_keep_their_names(tmp_path):
    import pystac

    out = tmp_path / "out"
    write_output(out, "north/t1", refined(0), meta_of("t1", transform=transform_at(0, 0)))
    rebuild(out)
    assert (out / TILES_FILE).read_text() == "north/t1\n"
    item = pystac.Collection.from_file(str(out / COLLECTION_KEY)).get_item("north/t1")
    assert Path(item.assets["opt_v2"].get_absolute_href()) == out / "north" / "t1.tif"


# ---------------------------------------------------------------------------- earlier versions
def test_outputs_of_an_earlier_version_get_their_keys_from_their_rasters(tmp_path):
    import pystac

    out = tmp_path / "out"
    arrays = {"old_npz": refined(0, nan_rows=3), "old_cog": refined(1)}
    write_legacy_output(out, "old_npz", arrays["old_npz"], meta_of("old_npz", transform=transform_at(0, 0)), "npz")
    write_legacy_output(out, "old_cog", arrays["old_cog"], meta_of("old_cog", transform=transform_at(64, 0)), "cog")
    assert "crs" not in json.loads((out / "old_cog.json").read_text())        # its place is in the COG alone
    result = rebuild(out)

    assert result.derived == 2 and result.outputs == ["old_cog", "old_npz"] and result.tiles == ["old_cog"]
    assert_stats_equal(result.band_stats, pooled(list(arrays.values())))
    collection = pystac.Collection.from_file(str(out / COLLECTION_KEY))
    old_cog = collection.get_item("old_cog")
    assert old_cog.properties["proj:code"] == "EPSG:32633" and old_cog.properties["proj:shape"] == [48, 64]
    assert old_cog.properties["proj:transform"] == transform_at(64, 0)
    stats = collection.get_item("old_npz").assets["npz"]
    assert stats.media_type == "application/x-npz"


# ---------------------------------------------------------------------------- small parts
@pytest.mark.parametrize("acquired, want", [
    ("2020-06-15T10:30:00Z", {"datetime": "2020-06-15T10:30:00Z"}),
    ("2020-06-15T12:30:00+02:00", {"datetime": "2020-06-15T10:30:00Z"}),
    ("2020-06-15T10:30:00", {"datetime": "2020-06-15T10:30:00Z"}),          # no zone: read as UTC
    ("2020-06-15", {"datetime": None, "start_datetime": "2020-06-15T00:00:00Z",
                    "end_datetime": "2020-06-15T23:59:59Z"}),
    (None, {"datetime": None, "start_datetime": "2014-04-03T00:00:00Z", "end_datetime": "2025-06-01T12:00:00Z"}),
    ("last summer", {"datetime": None, "start_datetime": "2014-04-03T00:00:00Z",
                     "end_datetime": "2025-06-01T12:00:00Z"}),
])
def test_the_item_time_is_the_acquisition_never_the_processing_time(acquired, want):
    assert stac_docs.acquisition_times({"acquired": acquired, "timestamp": "2025-06-01T14:00:00+02:00"}) == want


@pytest.mark.parametrize("src, dst, want", [
    ("_stage2_stac/items/a.json", "a.tif", "../../a.tif"),
    ("_stage2_stac/items/sub/a.json", "sub/a.tif", "../../../sub/a.tif"),
    ("_stage2_stac/collection.json", "_stage2_stac/items/sub/a.json", "./items/sub/a.json"),
    ("_stage2_stac/items/sub/a.json", "_stage2_stac/collection.json", "../../collection.json"),
    ("a.json", "b.tif", "./b.tif"),
])
def test_links_are_relative_to_the_document(src, dst, want):
    assert href(src, dst) == want


def test_a_crs_without_an_epsg_code_is_given_as_wkt2(tmp_path):
    import pystac
    from rasterio.crs import CRS as RioCRS

    laea = RioCRS.from_proj4("+proj=laea +lat_0=52 +lon_0=10 +x_0=4321000 +y_0=3210000 +ellps=GRS80 +units=m")
    out = tmp_path / "out"
    meta = {**meta_of("w"), "crs": laea.to_wkt(), "transform": [10.0, 0.0, 4321000.0, 0.0, -10.0, 3210000.0]}
    write_output(out, "w", refined(0), meta)
    rebuild(out)
    with offline_stac_validation():
        item = pystac.Collection.from_file(str(out / COLLECTION_KEY)).get_item("w")
        assert item.validate()
    assert item.properties["proj:code"] is None and item.properties["proj:wkt2"].startswith("PROJCRS[")
    assert item.bbox == pytest.approx([10.0, 51.9957, 10.0093, 52.0], abs=1e-4)      # the grid's origin, (10E, 52N)
