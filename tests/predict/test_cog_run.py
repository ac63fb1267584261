"""output_format=npz|cog|both in a run (SPEC 10): a valid, georeferenced COG equal to the NPZ of the same run,
not_georeferenced counted, reruns that trust only whole COGs, and an unknown format refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

from geotiffs import CRS, TILE_120, TILE_256, TRANSFORM, demo_array, write_geotiff
from helpers import compose_predict, read_opt_v2
from stage2.predict.app import run

META = {"month": 6, "biome_code": 4}


def _run(capsys, ckpt, inp, out, *overrides):
    code = run(compose_predict(f"checkpoint={ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu",
                               "precision=32", *overrides))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _summary(out):
    return json.loads((out / "_stage2_summary.json").read_text())


def test_geotiff_in_cog_out_is_a_valid_cog_equal_to_the_npz_of_the_same_run(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_geotiff(inp / "a.tif", demo_array(TILE_120), meta=META)
    write_geotiff(inp / "b.tif", demo_array(TILE_256), meta=META)

    code, _, _ = _run(capsys, tiny_ckpt, inp, out, "output_format=both")

    assert code == 0 and _summary(out)["not_georeferenced"] == 0
    for name in ("a", "b"):
        cog = out / f"{name}.tif"
        valid, errors, _ = cog_validate(str(cog), quiet=True)
        assert valid, errors
        with rasterio.open(cog) as ds:
            assert ds.crs.to_string() == CRS and tuple(ds.transform)[:6] == TRANSFORM
            assert ds.descriptions == ("B02", "B03", "B04", "B08") and ds.dtypes[0] == "float32"
            assert np.isnan(ds.nodata) and ds.block_shapes[0] == (256, 256)     # cog.blocksize
            values = ds.read()
        np.testing.assert_allclose(values, read_opt_v2(out / f"{name}.npz"), atol=1e-6)
        meta = json.loads((out / f"{name}.json").read_text())
        assert meta["crs"] == CRS and meta["transform"] == list(TRANSFORM)
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("_"))
    assert names == ["a.json", "a.npz", "a.tif", "b.json", "b.npz", "b.tif"]

    code, stdout, _ = _run(capsys, tiny_ckpt, inp, out, "output_format=both")
    assert code == 0 and "nothing to do: 2 tiles already done" in stdout


def test_npz_inputs_to_cog_take_the_sidecar_georeferencing_and_count_the_others(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    np.savez(inp / "geo.npz", opt_v1=demo_array(TILE_120))
    (inp / "geo.json").write_text(json.dumps({**META, "crs": CRS, "transform": list(TRANSFORM)}))
    np.savez(inp / "plain.npz", opt_v1=demo_array(TILE_120))

    code, stdout, _ = _run(capsys, tiny_ckpt, inp, out, "output_format=cog")

    assert code == 0 and _summary(out)["not_georeferenced"] == 1
    assert "not georeferenced 1 COGs" in stdout
    with rasterio.open(out / "geo.tif") as ds:
        assert ds.crs.to_string() == CRS and tuple(ds.transform)[:6] == TRANSFORM
    with rasterio.open(out / "plain.tif") as ds:
        assert ds.crs is None
    assert not (out / "geo.npz").exists() and (out / "plain.json").is_file()


def test_a_truncated_or_missing_cog_is_redone_on_the_next_run(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    for name in ("a", "b", "c"):
        write_geotiff(inp / f"{name}.tif", demo_array(TILE_256), meta=META)
    assert _run(capsys, tiny_ckpt, inp, out, "output_format=cog")[0] == 0
    whole = (out / "a.tif").read_bytes()
    (out / "a.tif").write_bytes(whole[: len(whole) // 2])
    (out / "b.tif").unlink()

    code, _, _ = _run(capsys, tiny_ckpt, inp, out, "output_format=cog")

    s = _summary(out)
    assert code == 0 and (s["processed"], s["skipped"]) == (2, 1)
    assert (out / "a.tif").read_bytes() == whole and cog_validate(str(out / "b.tif"), quiet=True)[0]


def test_an_npz_run_does_not_make_a_cog_run_done(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_geotiff(inp / "a.tif", demo_array(TILE_120), meta=META)
    assert _run(capsys, tiny_ckpt, inp, out)[0] == 0

    code, _, _ = _run(capsys, tiny_ckpt, inp, out, "output_format=cog")

    assert code == 0 and _summary(out)["processed"] == 1 and (out / "a.tif").is_file()


@pytest.mark.parametrize(("override", "words"), [("output_format=tiff", "output_format='tiff' is not one of"),
                                                 ("cog.compress=lzw", "cog.compress='lzw'")])
def test_an_unknown_output_format_or_cog_setting_is_a_run_error(tmp_path, tiny_ckpt, capsys, override, words):
    inp = tmp_path / "in"
    write_geotiff(inp / "a.tif", demo_array(TILE_120), meta=META)

    code, _, err = _run(capsys, tiny_ckpt, inp, tmp_path / "out", override)

    assert code == 2 and words in err and not (tmp_path / "out").exists()
