"""Reading and writing one tile and its sidecar (SPEC 2, 3)."""


import numpy as np
import pytest

from helpers import make_tile
from stage2.tiles import TileError, normalise_biome, normalise_month, read_tile


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


# ----------------------------------------------------------------------------- odd sidecars (SPEC 2, 3)
def test_sidecar_with_a_byte_order_mark_and_non_strict_numbers(tmp_path):
    make_tile(tmp_path / "t.npz")
    (tmp_path / "t.json").write_bytes(b"\xef\xbb\xbf" + b'{"month": "jul", "cloud": NaN, "gain": Infinity, '
                                      b'"offsets": [1.5, -Infinity]}')
    tile = read_tile(tmp_path / "t.npz")
    assert tile.month == 7
    assert (tile.meta["cloud"], tile.meta["gain"], tile.meta["offsets"]) == (None, None, [1.5, None])


@pytest.mark.parametrize("month,words", [("13", "month '13' is out of range 1-12"), (13.0, "13.0"),
                                         ("0", "month '0' is out")])
def test_month_messages_quote_what_the_sidecar_says(tmp_path, month, words):
    make_tile(tmp_path / "t.npz", meta={"month": month})
    with pytest.raises(TileError) as err:
        read_tile(tmp_path / "t.npz")
    assert words in err.value.reason and (month == 13.0 or "13.0" not in err.value.reason)


@pytest.mark.parametrize("value", ["", "  "])
def test_blank_month_and_biome_use_the_defaults(tmp_path, value):
    make_tile(tmp_path / "t.npz", meta={"month": value, "biome_code": value})
    tile = read_tile(tmp_path / "t.npz")
    assert (tile.month, tile.biome, tile.defaults) == (6, 0, ["month", "biome_code"])


# ----------------------------------------------------------------------------- discovery
def test_recursive_discovery_follows_symlinked_folders_once_and_skips_the_output_dir(tmp_path):
    from stage2.tiles import discover

    inp, real = tmp_path / "in", tmp_path / "elsewhere"
    for p in (inp / "a.npz", inp / "sub" / "b.npz", real / "c.npz", real / "deep" / "d.npz", inp / ".hidden" / "e.npz",
              inp / "out" / "a.npz"):
        make_tile(p, 16, 16)
    (inp / "linked").symlink_to(real, target_is_directory=True)
    (inp / "sub" / "loop").symlink_to(inp, target_is_directory=True)     # a link loop ends
    files, _ = discover(inp, recursive=True, exclude=inp / "out")
    assert [p.relative_to(inp).as_posix() for p in files] == [
        "a.npz", "linked/c.npz", "linked/deep/d.npz", "sub/b.npz"]
    assert [p.name for p in discover(inp, recursive=False)[0]] == ["a.npz"]


def test_a_symlinked_tile_finds_its_sidecar_and_one_beside_the_link_wins(tmp_path):
    real, inp = tmp_path / "stage1", tmp_path / "in"
    make_tile(real / "x.npz", meta={"month": 3})
    make_tile(real / "y.npz", meta={"month": 4})
    inp.mkdir()
    (inp / "x.npz").symlink_to(real / "x.npz")
    (inp / "y.npz").symlink_to(real / "y.npz")
    (inp / "y.json").write_text('{"month": 9}')
    assert read_tile(inp / "x.npz").month == 3
    assert read_tile(inp / "y.npz").month == 9
