"""Predict with GeoTIFF inputs (SPEC 2, 10): the same outputs as the NPZ of the same pixels, integer DNs with
input_scale, nodata under nan_policy=mask, scene-sized rasters in windows, name clashes, and reruns."""

from __future__ import annotations

import json

import numpy as np

from geotiffs import TILE_120, TILE_256, demo_array, to_dn, write_geotiff
from helpers import compose_predict, read_opt_v2
from stage2.predict.app import run

META = {"month": 6, "biome_code": 4}


def _run(capsys, ckpt, inp, out, *overrides):
    code = run(compose_predict(f"checkpoint={ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu",
                               "precision=32", *overrides))
    captured = capsys.readouterr()
    return code, captured.out


def _summary(out):
    return json.loads((out / "_stage2_summary.json").read_text())


def _npz_and_tif(tmp_path, arrays):
    """The same pixels as NPZ in npz/ and as GeoTIFF in tif/, each with its sidecar."""
    (tmp_path / "npz").mkdir()
    for name, arr in arrays.items():
        np.savez(tmp_path / "npz" / f"{name}.npz", opt_v1=arr)
        (tmp_path / "npz" / f"{name}.json").write_text(json.dumps(META))
        write_geotiff(tmp_path / "tif" / f"{name}.tif", arr, meta=META)


def test_a_geotiff_aoi_gives_the_outputs_of_the_npz_of_the_same_pixels(tmp_path, tiny_ckpt, capsys):
    _npz_and_tif(tmp_path, {"a": demo_array(TILE_120), "b": demo_array(TILE_256)})

    assert _run(capsys, tiny_ckpt, tmp_path / "npz", tmp_path / "o_npz")[0] == 0
    code, out = _run(capsys, tiny_ckpt, tmp_path / "tif", tmp_path / "o_tif")

    assert code == 0 and _summary(tmp_path / "o_tif")["processed"] == 2
    for name in ("a", "b"):
        want = read_opt_v2(tmp_path / "o_npz" / f"{name}.npz")
        np.testing.assert_allclose(read_opt_v2(tmp_path / "o_tif" / f"{name}.npz"), want, atol=1e-6)
        meta = json.loads((tmp_path / "o_tif" / f"{name}.json").read_text())
        size = (tmp_path / "tif" / f"{name}.tif").stat().st_size
        assert meta["month"] == 6 and meta["processing"]["input_size"] == size
    code, out = _run(capsys, tiny_ckpt, tmp_path / "tif", tmp_path / "o_tif")
    assert code == 0 and "nothing to do: 2 tiles already done" in out      # rerun trust accepts .tif inputs


def test_integer_dns_run_with_input_scale_and_fail_without_it_naming_the_key(tmp_path, tiny_ckpt, capsys):
    arr = demo_array(TILE_120)
    write_geotiff(tmp_path / "in" / "dn.tif", to_dn(arr), meta=META)

    code, _ = _run(capsys, tiny_ckpt, tmp_path / "in", tmp_path / "o1")
    fail = _summary(tmp_path / "o1")["first_failures"][0]
    assert code == 1 and "integer" in fail["reason"] and "input_scale=0.0001" in fail["hint"]

    code, _ = _run(capsys, tiny_ckpt, tmp_path / "in", tmp_path / "o2", "input_scale=0.0001", "input_offset=-0.1")
    (tmp_path / "ref").mkdir()
    np.savez(tmp_path / "ref" / "dn.npz", opt_v1=arr)
    (tmp_path / "ref" / "dn.json").write_text(json.dumps(META))
    assert _run(capsys, tiny_ckpt, tmp_path / "ref", tmp_path / "o3")[0] == 0
    assert code == 0
    # DN rounding moves inputs by at most 5e-5; the refined output follows closely
    np.testing.assert_allclose(read_opt_v2(tmp_path / "o2" / "dn.npz"), read_opt_v2(tmp_path / "o3" / "dn.npz"),
                               atol=2e-3)


def test_geotiff_nodata_is_no_data_under_mask_and_fails_the_tile_otherwise(tmp_path, tiny_ckpt, capsys):
    dn = to_dn(demo_array(TILE_120))
    dn[:, :10, :20] = 0
    write_geotiff(tmp_path / "in" / "nd.tif", dn, nodata=0, meta=META)
    scale = ("input_scale=0.0001", "input_offset=-0.1")

    code, _ = _run(capsys, tiny_ckpt, tmp_path / "in", tmp_path / "o1", *scale)
    fail = _summary(tmp_path / "o1")["first_failures"][0]
    assert code == 1 and "200 no-data pixels (the file's nodata value 0)" in fail["reason"]
    assert "nan_policy=mask" in fail["hint"]

    code, _ = _run(capsys, tiny_ckpt, tmp_path / "in", tmp_path / "o2", *scale, "nan_policy=mask")
    v2 = read_opt_v2(tmp_path / "o2" / "nd.npz")
    assert code == 0 and np.isnan(v2[:, :10, :20]).all() and np.isfinite(v2[:, 10:, :]).all()


def test_a_scene_sized_geotiff_runs_in_windows_like_its_npz(tmp_path, tiny_ckpt, capsys):
    arr = np.tile(demo_array(TILE_256), (1, 3, 3))[:, :700, :600]      # above window.above=512: windowed
    _npz_and_tif(tmp_path, {"scene": arr})

    assert _run(capsys, tiny_ckpt, tmp_path / "npz", tmp_path / "o_npz")[0] == 0
    assert _run(capsys, tiny_ckpt, tmp_path / "tif", tmp_path / "o_tif")[0] == 0

    np.testing.assert_allclose(read_opt_v2(tmp_path / "o_tif" / "scene.npz"),
                               read_opt_v2(tmp_path / "o_npz" / "scene.npz"), atol=1e-6)


def test_an_npz_and_a_geotiff_of_one_name_both_fail_and_other_tiles_run(tmp_path, tiny_ckpt, capsys):
    arr = demo_array(TILE_120)
    (tmp_path / "in").mkdir()
    np.savez(tmp_path / "in" / "a.npz", opt_v1=arr)
    write_geotiff(tmp_path / "in" / "a.tif", arr)
    write_geotiff(tmp_path / "in" / "b.TIF", arr)

    code, _ = _run(capsys, tiny_ckpt, tmp_path / "in", tmp_path / "out")

    s = _summary(tmp_path / "out")
    assert code == 1 and (s["found"], s["processed"], s["failed"]) == (3, 1, 2)
    assert sorted(f["file"].rsplit("/", 1)[-1] for f in s["first_failures"]) == ["a.npz", "a.tif"]
    assert all("same name 'a'" in f["reason"] for f in s["first_failures"])
    assert (tmp_path / "out" / "b.json").is_file() and not (tmp_path / "out" / "a.json").exists()
