"""What evaluate says about a whole run: pooled RMSE, the per-tile RMSE ratios, whether a TTA run's std
ranks its real error, and another run's RMSE beside (reference_dir), on screen and in the JSON.

Outputs are written by the product's one writer, with a std layer as a TTA run writes it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from helpers import compose_app
from stage2.evaluate import metrics
from stage2.evaluate.app import run
from stage2.evaluate.score import evaluate_dirs
from stage2.evaluate.table import format_evaluation

SIZES = {"a": (32, 40), "b": (48, 48), "c": (24, 32)}


def _write(out: Path, name: str, v2: np.ndarray, std: np.ndarray | None = None, tta: str = "none") -> None:
    from stage2.product import write_output

    out.mkdir(parents=True, exist_ok=True)
    layers = {"opt_v2": v2} if std is None else {"opt_v2": v2, "opt_v2_std": std}
    write_output(out, name, layers, {"processing": {"tta": tta}}, output_format="npz", geo=None, cog_settings=None)


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    """Three tiles of different sizes: the output halves a's input error, keeps b's, makes c's 10 % worse.
    The std is the real error of each pixel plus noise (ranks it, not perfectly); the reference run's
    output is the input moved a quarter of the way to the truth."""
    rng = np.random.default_rng(3)
    f = {k: tmp_path / k for k in ("truth", "s1", "out", "ref")}
    for d in f.values():
        d.mkdir()
    for name, (h, w) in SIZES.items():
        truth = rng.uniform(0.05, 0.6, (4, h, w)).astype(np.float32)
        v1 = np.clip(truth + rng.normal(0, 0.03, truth.shape), 0, 1).astype(np.float32)
        k = {"a": 0.5, "b": 1.0, "c": 1.1}[name]
        v2 = (truth + k * (v1 - truth)).astype(np.float32)
        std = (np.abs(v2 - truth) + rng.uniform(0, 0.01, truth.shape)).astype(np.float32)
        np.savez(f["truth"] / f"{name}.npz", opt_v1=truth)
        np.savez(f["s1"] / f"{name}.npz", opt_v1=v1)
        _write(f["out"], name, v2, std, tta="d4")
        _write(f["ref"], name, (truth + 0.75 * (v1 - truth)).astype(np.float32))
    return f


def _arrays(f: dict[str, Path], name: str, folder: str = "out") -> tuple[np.ndarray, ...]:
    truth = np.load(f["truth"] / f"{name}.npz")["opt_v1"].astype(np.float64)
    with np.load(f[folder] / f"{name}.npz") as z:
        return truth, z["opt_v2"].astype(np.float64), z["opt_v2_std"] if "opt_v2_std" in z.files else None


def test_pooled_rmse_ratios_and_the_closing_line(folders):
    ev = evaluate_dirs(folders["truth"], folders["s1"], folders["out"])
    sq, n, ratios = 0.0, 0, {}
    for name in SIZES:
        truth, v2, _ = _arrays(folders, name)
        v1 = np.load(folders["s1"] / f"{name}.npz")["opt_v1"].astype(np.float64)
        sq, n = sq + ((v2 - truth) ** 2).sum(), n + truth.size
        ratios[name] = math.sqrt(((v2 - truth) ** 2).mean()) / math.sqrt(((v1 - truth) ** 2).mean())
    assert ev.pooled["after"]["rmse"] == pytest.approx(math.sqrt(sq / n), rel=1e-9)
    assert ev.pooled["after"]["rmse"] != pytest.approx(ev.mean("after", "rmse"), rel=1e-4)   # tiles differ in size
    assert ev.pooled["pixels"] == sum(h * w for h, w in SIZES.values())
    assert [t.rmse_ratio for t in ev.tiles] == pytest.approx([ratios[k] for k in sorted(SIZES)], rel=1e-6)
    r = ev.ratios()
    assert r["median"] == pytest.approx(1.0, abs=1e-6) and r["worst"] == pytest.approx(1.1, rel=1e-5)
    assert r["worst_tile"] == "c" and r["worse"] == 1
    line = format_evaluation(ev).splitlines()[-1]
    assert line.startswith("RMSE(opt_v2)/RMSE(opt_v1) per tile: median 1.000, worst 1.100 (c); "
                           "1 of 3 tiles worse by more than 2 %.")
    assert "pooled RMSE" in line and "RMSE improved on 1 of 3 tiles" in line


def test_the_std_ranks_the_error_per_tile_and_pooled(folders):
    ev = evaluate_dirs(folders["truth"], folders["s1"], folders["out"])
    pooled_s, pooled_e = [], []
    for t in ev.tiles:
        truth, v2, std = _arrays(folders, t.name)
        s, e = std.mean(axis=0).ravel(), np.abs(v2 - truth).mean(axis=0).ravel()
        pooled_s.append(s)
        pooled_e.append(e)
        assert t.confidence["spearman"] == pytest.approx(spearmanr(s, e).statistic, abs=1e-6)
        assert t.confidence["std_mean"] == pytest.approx(std.mean(), rel=1e-6)
        assert t.confidence["pixels"] == s.size and 0.5 < t.confidence["spearman"] < 1
    ref = spearmanr(np.concatenate(pooled_s), np.concatenate(pooled_e)).statistic
    assert ev.spearman_pooled["spearman"] == pytest.approx(ref, abs=1e-6)
    assert ev.tta == "d4"
    text = format_evaluation(ev)
    assert "per-pixel Spearman of the std with |opt_v2 - truth|" in text
    assert ("RMSE without TTA needs a run without TTA over the same tiles: pass reference_dir=<its output_dir>"
            in text)


def test_a_capped_sample_is_uniform_and_seeded():
    rng = np.random.default_rng(0)
    tiles = [(rng.random(n), rng.random(n)) for n in (5000, 300, 12000)]
    a = metrics.RankSample(cap=2000)
    own = [a.add(*t) for t in tiles]
    assert [s.size for s, _ in own] == [2000, 300, 2000]       # a tile's own sample: all of it up to the cap
    assert a.pairs.shape == (2, 2000) and a.pixels == 17300
    b = metrics.RankSample(cap=2000)
    for t in tiles:
        b.add(*t)
    np.testing.assert_array_equal(a.pairs, b.pairs)              # seeded: the same sample every run
    # every pixel is as likely to be drawn: the big tile gives about 12000/17300 of the sample
    big = np.isin(a.pairs[0], tiles[2][0].astype(np.float32)).sum()
    assert abs(big / 2000 - 12000 / 17300) < 0.05


def test_reference_dir_shows_the_rmse_without_tta_beside(folders, capsys):
    cfg = compose_app("evaluate", [], truth_dir=folders["truth"], input_dir=folders["s1"],
                      output_dir=folders["out"], reference_dir=folders["ref"], figures=False)
    assert run(cfg) == 0
    out = capsys.readouterr().out
    assert "RMSE ref (tta=none)" in out and "RMSE (tta=d4)" in out and "needs a run without TTA" not in out
    saved = json.loads((folders["out"] / "_stage2_evaluation.json").read_text())
    sq, n = 0.0, 0
    for tile in saved["tiles"]:
        truth, ref, _ = _arrays(folders, tile["name"], "ref")
        rmse = math.sqrt(((ref - truth) ** 2).mean())
        assert tile["reference"]["rmse"] == pytest.approx(rmse, rel=1e-6)
        assert f"{rmse:.4f}" in next(line for line in out.splitlines() if line.startswith(tile["name"] + " ")
                                     and "std" not in line and len(line.split()) == 6)
        sq, n = sq + ((ref - truth) ** 2).sum(), n + truth.size
    assert saved["pooled"]["reference"]["rmse"] == pytest.approx(math.sqrt(sq / n), rel=1e-6)
    assert saved["reference_dir"] == str(folders["ref"]) and saved["reference_tta"] == "none"
    assert saved["tta"] == "d4" and saved["confidence"]["spearman_pooled"]["spearman"] > 0.5
    assert saved["rmse_ratio"]["worst_tile"] == "c" and saved["rmse_ratio"]["worse"] == 1
    assert set(saved["mean"]["after"]) == {"rmse", "psnr", "ndvi_rmse", "edge_preservation", "ssim", "sam"}
    assert saved["literature"]["DSen2-CR"] | {"what": ""} == {"psnr": 28.7, "ssim": 0.875, "sam": 8.15, "what": ""}
