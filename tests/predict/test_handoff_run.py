"""The hand-off files a run writes (tile list, TerraTorch file, STAC catalog): rebuilt from the outputs
the run trusts, on every run and on a stale "nothing to do", never naming an output that is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from geotiffs import CRS, TRANSFORM, demo_array, write_geotiff
from helpers import compose_predict, make_tile
from stage2.predict.app import run


def _run(ckpt, inp, out, *overrides) -> int:
    return run(compose_predict(f"checkpoint={ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu",
                               "precision=32", *overrides))


def _aoi(inp, n: int = 3) -> list[str]:
    """NPZ tiles placed by their sidecars, and one GeoTIFF scene."""
    names = []
    for i in range(n):
        make_tile(inp / f"t{i}.npz", 40, 48, seed=i,
                  meta={"month": 5, "crs": CRS, "transform": list(TRANSFORM), "acquired": f"2021-05-0{i + 1}"})
        names.append(f"t{i}")
    write_geotiff(inp / "scene.tif", demo_array())
    return [*names, "scene"]


def _collection_items(out) -> list[str]:
    col = json.loads((out / "_stage2_stac" / "collection.json").read_text())
    items = [link["href"] for link in col["links"] if link["rel"] == "item"]
    return sorted(json.loads((out / "_stage2_stac" / h).read_text())["id"] for h in items)


def test_a_cog_run_lists_every_output_and_a_rerun_repairs_the_hand_off(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    names = _aoi(inp)
    assert _run(tiny_ckpt, inp, out, "output_format=cog") == 0
    assert (out / "_stage2_tiles.txt").read_text().splitlines() == sorted(names)
    assert _collection_items(out) == sorted(names)
    summary = json.loads((out / "_stage2_summary.json").read_text())
    assert summary["handoff"]["outputs"] == 4 and summary["handoff"]["terratorch"] is True
    n = sum(json.loads((out / f"{k}.json").read_text())["band_stats"]["B02"]["count"] for k in names)
    assert summary["band_stats"]["B02"]["count"] == n == 3 * 40 * 48 + 120 * 120
    assert "hand-off" in capsys.readouterr().out

    # nothing to do and nothing stale: the files are left as they are
    stamp = (out / "_stage2_stac" / "collection.json").stat().st_mtime_ns
    assert _run(tiny_ckpt, inp, out, "output_format=cog") == 0
    assert (out / "_stage2_stac" / "collection.json").stat().st_mtime_ns == stamp

    # the tile list deleted by hand: nothing to do, but the hand-off is rebuilt
    (out / "_stage2_tiles.txt").unlink()
    assert _run(tiny_ckpt, inp, out, "output_format=cog") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "_stage2_tiles.txt").read_text().splitlines() == sorted(names)

    # an output deleted: the rerun redoes it and lists it again
    (out / "t1.tif").unlink()
    assert _run(tiny_ckpt, inp, out, "output_format=cog") == 0
    assert (out / "t1.tif").is_file() and _collection_items(out) == sorted(names)
    assert (out / "_stage2_tiles.txt").read_text().splitlines() == sorted(names)


def test_a_tile_that_fails_is_not_listed_and_catalog_false_writes_nothing(tmp_path, tiny_ckpt):
    inp, out, bare = tmp_path / "in", tmp_path / "out", tmp_path / "bare"
    names = _aoi(inp, 2)
    (inp / "bad.npz").write_bytes(b"not a zip")
    assert _run(tiny_ckpt, inp, out, "output_format=both") == 1
    assert (out / "_stage2_tiles.txt").read_text().splitlines() == sorted(names)
    assert _collection_items(out) == sorted(names)
    assert _run(tiny_ckpt, inp, bare, "catalog=false") == 1
    assert not [p.name for p in bare.iterdir() if p.name.startswith(("_stage2_stac", "_stage2_tiles",
                                                                      "_stage2_terratorch"))]


def test_require_georeference_fails_an_unplaced_tile_with_its_reason(tmp_path, tiny_ckpt):
    inp, out = tmp_path / "in", tmp_path / "out"
    _aoi(inp, 1)
    make_tile(inp / "unplaced.npz", 32, 32, meta={"month": 2})
    assert _run(tiny_ckpt, inp, out, "output_format=cog", "require_georeference=true") == 1
    failures = [json.loads(line) for line in (out / "_stage2_failures.jsonl").read_text().splitlines()]
    assert [os.path.basename(f["file"]) for f in failures] == ["unplaced.npz"]
    assert "cannot be placed on a map" in failures[0]["reason"] and "crs" in failures[0]["hint"]
    assert not (out / "unplaced.tif").exists()
    assert (out / "_stage2_tiles.txt").read_text().splitlines() == ["scene", "t0"]


@pytest.mark.parametrize("sig", [signal.SIGKILL])
def test_a_killed_rerun_never_leaves_a_catalog_naming_a_missing_output(tmp_path, tiny_ckpt, sig):
    """A rerun that redoes outputs withdraws the catalog before removing them; killed at any moment
    after that, the folder has no catalog that names a missing output, and the next run repairs it."""
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(40):
        make_tile(inp / f"t{i:02d}.npz", 48, 48, seed=i)
    assert _run(tiny_ckpt, inp, out) == 0
    for p in inp.glob("t*.npz"):           # every input changed: every output is redone
        os.utime(p, (time.time() + 5, time.time() + 5))
    args = [sys.executable, "-m", "stage2.predict", f"checkpoint={tiny_ckpt}", f"input_dir={inp}",
            f"output_dir={out}", "hardware=cpu", "precision=32", "batch_size=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None and len(list(out.glob("t*.json"))) in (0, 40):
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(sig)
    p.wait(timeout=60)
    present = {q.stem for q in out.glob("t*.json")}
    assert 0 < len(present) < 40
    if (out / "_stage2_stac" / "collection.json").exists():
        assert set(_collection_items(out)) <= present
    if (out / "_stage2_tiles.txt").exists():
        assert set((out / "_stage2_tiles.txt").read_text().splitlines()) <= present
    assert _run(tiny_ckpt, inp, out) == 0
    assert _collection_items(out) == sorted(f"t{i:02d}" for i in range(40))
