"""Reading and writing one tile and its sidecar (SPEC 2, 3)."""

import json

import numpy as np
import pytest

from helpers import make_tile
from stage2.tiles import TileError, is_done, normalise_biome, normalise_month, read_output, read_tile, write_tile


@pytest.mark.parametrize("value,expected", [
    (6, 6), ("6", 6), (6.0, 6), (" 6 ", 6), ("6.0", 6), ("jun", 6), ("June", 6), ("JUNE", 6), (" june ", 6),
    ("Jun", 6), ("sep", 9), ("Sept", 9), ("september", 9), ("dec", 12), (1, 1), (12, 12), ("january", 1),
])
def test_month_spellings(value, expected):
    assert normalise_month(value) == expected


@pytest.mark.parametrize("value", [0, 13, -1, "13", "junuary", 6.5, "", True, None, [6]])
def test_bad_months_are_rejected(value):
    with pytest.raises(ValueError):
        normalise_month(value)


@pytest.mark.parametrize("value,expected", [(0, 0), (15, 15), ("7", 7), (" 3 ", 3), (4.0, 4)])
def test_biome_forms(value, expected):
    assert normalise_biome(value) == expected


@pytest.mark.parametrize("value", [16, -1, "forest", 2.5, True])
def test_bad_biomes_are_rejected(value):
    with pytest.raises(ValueError):
        normalise_biome(value)


def test_read_keeps_metadata_verbatim_and_normalises(tmp_path):
    meta = {"month": "Jun", "biome_code": "4", "tile_id": "../../x", "nested": {"a": [1, 2, None]},
            "acquired": None, "ünï": "cödé"}
    arr = make_tile(tmp_path / "tile_0001.npz", 97, 133, meta=meta)
    tile = read_tile(tmp_path / "tile_0001.npz")
    assert tile.name == "tile_0001"
    assert tile.array.dtype == np.float32 and tile.array.shape == (4, 97, 133)
    np.testing.assert_array_equal(tile.array, arr)
    assert (tile.month, tile.biome, tile.defaults) == (6, 4, [])
    assert tile.meta == {**meta, "month": 6, "biome_code": 4}


@pytest.mark.parametrize("meta,defaults", [
    (None, ["month", "biome_code"]),
    ({"tile_id": "a"}, ["month", "biome_code"]),
    ({"month": None, "biome_code": 3}, ["month"]),
    ({"month": 2}, ["biome_code"]),
])
def test_missing_metadata_falls_back_and_is_listed(tmp_path, meta, defaults):
    make_tile(tmp_path / "t.npz", meta=meta)
    tile = read_tile(tmp_path / "t.npz")
    assert tile.defaults == defaults
    assert tile.month == (6 if "month" in defaults else meta["month"])
    assert tile.biome == (0 if "biome_code" in defaults else meta["biome_code"])


def test_float64_is_accepted_as_float32(tmp_path):
    make_tile(tmp_path / "t.npz", dtype=np.float64)
    assert read_tile(tmp_path / "t.npz").array.dtype == np.float32


def test_bad_month_in_sidecar_is_a_tile_error(tmp_path):
    make_tile(tmp_path / "t.npz", meta={"month": 13})
    with pytest.raises(TileError, match="month"):
        read_tile(tmp_path / "t.npz")


def test_write_is_complete_and_leaves_no_temporaries(tmp_path):
    out = np.random.default_rng(0).random((4, 120, 120), dtype=np.float32)
    meta = {"month": 6, "stage": "stage2_refined", "tile_id": "../../evil"}
    write_tile(tmp_path, "tile_0001", out, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tile_0001.json", "tile_0001.npz"]
    assert is_done(tmp_path, "tile_0001")
    np.testing.assert_array_equal(read_output(tmp_path / "tile_0001.npz"), out)
    assert json.loads((tmp_path / "tile_0001.json").read_text()) == meta
