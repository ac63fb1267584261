"""Evaluation against a truth (stage2.evaluate: score, figures, app): what a user relies on.

In this process through the composed conf/evaluate.yaml; the command once as a user types it
(`python -m stage2.evaluate`). The Stage 1 stand-ins come from stage2.train.degrade, as in the demo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import compose_app, make_tile, run_cli
from stage2.evaluate.app import run
from stage2.evaluate.score import evaluate_dirs
from stage2.train.degrade import DegradeParams, degrade_dir

P = DegradeParams.from_config()      # conf/degradation/translator.yaml


def finished(out: Path, name: str, opt_v2: np.ndarray, output_format: str = "npz") -> None:
    """A finished Stage 2 output of `name` in `out`, as a run writes it."""
    from stage2.formats.cog import CogSettings
    from stage2.product import write_output

    out.mkdir(parents=True, exist_ok=True)
    settings = CogSettings(compress="zstd", level=1, blocksize=256, overviews="auto", resampling="average")
    write_output(out, name, {"opt_v2": opt_v2}, {}, output_format=output_format, geo=None, cog_settings=settings)


def test_evaluate_compares_outputs_and_inputs_against_the_truth(tmp_path, capsys):
    """Includes the smoke test of `python -m stage2.evaluate` (one subprocess); the error runs in this process."""
    truth, s1, out = tmp_path / "truth", tmp_path / "s1", tmp_path / "out"
    arrays = [make_tile(truth / f"t{i}.npz", 32, 40, seed=i) for i in range(2)]
    degrade_dir(truth, s1, seed=0, params=P)
    for i, a in enumerate(arrays):   # t0 perfect, t1 half-way between input and truth
        v1 = np.load(s1 / f"t{i}.npz")["opt_v1"]
        finished(out, f"t{i}", a if i == 0 else (a + v1) / 2)
    ev = evaluate_dirs(truth, s1, out)
    assert [t.name for t in ev.tiles] == ["t0", "t1"]
    assert ev.tiles[0].after["rmse"] == 0.0 and ev.tiles[0].before["rmse"] > 0.01
    assert ev.tiles[1].after["rmse"] == pytest.approx(ev.tiles[1].before["rmse"] / 2, rel=1e-4)
    assert ev.improved("rmse") == 2 and "closer to the truth" in ev.verdict()

    r = run_cli([f"truth_dir={truth}", f"input_dir={s1}", f"output_dir={out}"], module="stage2.evaluate")
    assert r.returncode == 0 and "mean" in r.stdout and "RMSE improved on 2 of 2 tiles" in r.stdout
    saved = json.loads((out / "_stage2_evaluation.json").read_text())
    assert saved["tiles"][0]["after"]["psnr"] is None          # infinite PSNR is written as null
    assert saved["mean"]["before"]["rmse"] == pytest.approx(np.mean([t.before["rmse"] for t in ev.tiles]))
    pngs = sorted(p.name for p in (out / "_stage2_evaluation").glob("*.png"))
    assert pngs == ["t0.png", "t1.png"] and (out / "_stage2_evaluation" / "t1.png").read_bytes()[:4] == b"\x89PNG"
    (truth / "t1.npz").unlink()
    assert run(compose_app("evaluate", [], truth_dir=truth, input_dir=s1, output_dir=out)) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"stage2.evaluate: error: truth {truth / 't1.npz'} does not exist: every output tile needs its truth with "
        "the same name"]
    assert run(compose_app("evaluate", [], input_dir=s1, output_dir=out)) == 2
    assert capsys.readouterr().err.splitlines() == [
        "stage2.evaluate: error: truth_dir is not set: pass truth_dir=... (the true optical tiles)"]


def test_a_truth_of_other_pixels_is_one_error_naming_the_tile(tmp_path, capsys):
    truth, s1, out = tmp_path / "truth", tmp_path / "s1", tmp_path / "out"
    make_tile(s1 / "t0.npz", 32, 40)
    a = make_tile(truth / "t0.npz", 32, 48)
    finished(out, "t0", a[:, :, :40])
    assert run(compose_app("evaluate", [], truth_dir=truth, input_dir=s1, output_dir=out, figures=False)) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("stage2.evaluate: error: tile t0: shapes differ (truth (4, 32, 48)")
    assert not (out / "_stage2_evaluation.json").exists()


def test_evaluate_reads_geotiff_inputs_and_cog_outputs(tmp_path):
    from geotiffs import write_geotiff

    truth, s1, out = tmp_path / "truth", tmp_path / "s1", tmp_path / "out"
    a = make_tile(truth / "t0.npz", 32, 40, seed=0)
    v1 = np.clip(a + 0.05, 0, 1)
    write_geotiff(s1 / "t0.tif", v1)
    finished(out, "t0", (a + v1) / 2, output_format="cog")

    ev = evaluate_dirs(truth, s1, out)

    assert [t.name for t in ev.tiles] == ["t0"] and not (out / "t0.npz").exists()
    assert ev.tiles[0].after["rmse"] == pytest.approx(ev.tiles[0].before["rmse"] / 2, rel=1e-4)
