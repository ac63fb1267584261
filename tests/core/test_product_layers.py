"""The std layer of the output contract (docs/confidence.md): `opt_v2_std` beside `opt_v2` in the NPZ, a COG
of its own (`<name>.std.tif`), listed in the JSON's `files`, removed with the output, read back as a layer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from stage2 import product, read_output
from stage2.formats.cog import CogSettings

COG = CogSettings(compress="zstd", level=1, blocksize=256, overviews="auto", resampling="average")
BOTH = (product.OUTPUT_KEY, product.STD_KEY)


def _layers(h: int = 40, w: int = 56) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"opt_v2": rng.uniform(0.01, 0.6, (4, h, w)).astype(np.float32),
            "opt_v2_std": rng.uniform(0.0, 0.02, (4, h, w)).astype(np.float32)}


@pytest.mark.parametrize("output_format, files", [
    ("npz", ["t.npz", "t.json"]),
    ("cog", ["t.tif", "t.std.tif", "t.json"]),
    ("both", ["t.npz", "t.tif", "t.std.tif", "t.json"]),
])
def test_an_output_with_a_std_has_its_files_and_is_done_only_with_all(output_format, files):
    assert product.output_keys("t", output_format, BOTH) == files
    assert product.is_done(set(files), "t", output_format, BOTH)
    without_std = {f for f in files if f != "t.std.tif"}
    assert product.is_done(without_std, "t", output_format, BOTH) == (output_format == "npz")   # the NPZ holds it
    assert product.output_keys("t", output_format) == [f for f in files if ".std." not in f]   # opt_v2 alone
    assert set(product.all_keys("t")) == {"t.json", "t.npz", "t.tif", "t.std.tif"}         # what a discard removes


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("output_format", ["npz", "cog", "both"])
def test_the_std_layer_is_written_listed_and_read_back(tmp_path, output_format):
    layers = _layers()
    product.write_output(tmp_path, "x", layers, {"tile_id": "x"}, output_format=output_format, geo=None,
                         cog_settings=COG)
    meta = json.loads((tmp_path / "x.json").read_text())
    assert [f["path"] for f in meta["files"]] == product.output_keys("x", output_format, BOTH)[:-1]
    assert {layer for f in meta["files"] for layer in f["layers"]} == set(BOTH)
    assert meta["band_stats"] == product.band_stats(layers["opt_v2"])         # of opt_v2, not of its std
    givens = ["x", "x.json", *(f["path"] for f in meta["files"])]
    for given in givens:
        got = read_output(tmp_path / given).layers
        assert list(got) == list(BOTH), given
        for key in BOTH:
            assert got[key].dtype == np.float32
            np.testing.assert_array_equal(got[key], layers[key])
    if output_format != "npz":
        with rasterio.open(tmp_path / "x.std.tif") as ds:
            assert ds.tags()["layer"] == "opt_v2_std" and ds.descriptions == ("B02", "B03", "B04", "B08")
        with rasterio.open(tmp_path / "x.tif") as ds:
            assert "layer" not in ds.tags()


def test_the_confidence_key_is_stage2s_own():
    out = product.output_metadata({"confidence": "stage 1's"}, processing={}, defaults=[], quality=None,
                                  timestamp="now", confidence={"mean_abs_change": float("nan")})
    assert out["stage1"] == {"confidence": "stage 1's"} and out["confidence"] == {"mean_abs_change": None}
