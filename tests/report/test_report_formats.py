"""The report over a GeoTIFF-in, COG-out run (SPEC 10): it reads the COGs where the run wrote no NPZ."""

from __future__ import annotations

from geotiffs import TILE_120, TILE_256, demo_array, write_geotiff
from helpers import compose_predict, run_cli
from stage2.predict.app import run

META = {"month": 6, "biome_code": 4}


def test_report_reads_cog_outputs_of_geotiff_inputs(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_geotiff(inp / "a.tif", demo_array(TILE_120), meta=META)
    write_geotiff(inp / "b.tiff", demo_array(TILE_256), meta=META)
    write_geotiff(inp / "c.tif", demo_array(TILE_120))
    assert run(compose_predict(f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu",
                               "output_format=cog", "quality=false")) == 0
    (out / "c.tif").write_bytes(b"not a tiff")

    r = run_cli([f"input_dir={inp}", f"output_dir={out}"], cwd=tmp_path, module="stage2.report")

    assert r.returncode == 1, r.stdout + r.stderr
    assert "inputs 3   complete outputs 2   problems 1" in r.stdout
    assert "c.tif is unreadable" in r.stdout
    assert sorted(p.name for p in (out / "_report" / "tiles").glob("*.png")) == ["a.png", "b.png"]
    assert not list(out.glob("*.npz"))
