"""Where the per-pixel statistics run (docs/confidence.md#where): `pixel_stats=device` computes quality,
confidence and band statistics of whole tiles batched beside the model; the JSONs a user reads are
those of `pixel_stats=host` (the NumPy forms) within 1e-5, for tiles of mixed sizes in one batch,
no-data pixels, with and without TTA, and windowed tiles keep their strip-by-strip figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import compose_predict, make_tile, read_json
from stage2 import read_output
from stage2.predict.app import run
from stage2.predict.confidence import std_stats
from stage2.predict.pixelstats import on_device, std_stats_torch
from stage2.tiles import BANDS

TOL = 1e-5


def _folder(inp) -> list[str]:
    names = []
    for i, (h, w) in enumerate([(64, 64), (48, 80), (45, 70), (40, 66), (33, 33), (150, 90)]):
        make_tile(inp / f"t{i}.npz", h, w, seed=i, meta={"month": 1 + i, "biome_code": i})
        names.append(f"t{i}")
    holes = make_tile(inp / "holes.npz", 48, 48, seed=9)
    holes[:, 5:20, 10:30] = np.nan
    np.savez(inp / "holes.npz", opt_v1=holes)
    return [*names, "holes"]


def _close(a, b, where: str) -> None:
    """Every number of two JSON objects equal within TOL (None where the other is None)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and abs(a - b) <= TOL * max(1.0, abs(a)), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("tta", ["none", "flips"])
def test_device_statistics_equal_the_host_ones_in_every_json(tmp_path, tiny_ckpt, capsys, tta):
    inp = tmp_path / "in"
    names = _folder(inp)
    outs = {}
    for where in ("host", "device"):
        out = tmp_path / where
        # batch 3: tiles of different sizes share padded batches; the 150 px tile runs in 64 px windows
        code = run(compose_predict(f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={out}",
                                   "hardware=cpu", "precision=32", f"tta={tta}", "nan_policy=mask",
                                   "batch_size=3", "window.size=64",
                                   "window.overlap=16", "window.above=128", f"pixel_stats={where}"))
        assert code == 0, capsys.readouterr()
        outs[where] = out
    for n in names:
        host, device = (read_json(outs[w] / f"{n}.json") for w in ("host", "device"))
        for key in ("quality", "confidence", "band_stats"):
            _close(host[key], device[key], f"{n}.{key}")
        a, b = (read_output(outs[w] / f"{n}.npz").layers for w in ("host", "device"))
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    assert read_json(outs["device"] / "t5.json")["processing"]["windows"]["count"] > 1
    host, device = (read_json(outs[w] / "_stage2_summary.json") for w in ("host", "device"))
    _close(host["band_stats"], device["band_stats"], "summary.band_stats")
    # the no-data pixels are left out: the count is the valid pixels of each band
    assert read_json(outs["device"] / "holes.json")["band_stats"]["B08"]["count"] == 48 * 48 - 15 * 20


def test_the_std_statistics_on_the_device_are_numpys_percentile():
    rng = np.random.default_rng(0)
    std = rng.gamma(2.0, 0.001, (3, 4, 37, 29)).astype(np.float32)
    valid = rng.random((3, 37, 29)) > 0.3
    valid[2] = False                                  # a tile without a valid pixel
    got = std_stats_torch(torch.from_numpy(std), torch.from_numpy(valid))
    for i in range(3):
        want = std_stats(std[i], valid[i])
        for band in BANDS:
            for k in ("std_mean", "std_p95"):
                if want[band][k] is None:
                    assert got[i][band][k] is None
                else:
                    assert got[i][band][k] == pytest.approx(want[band][k], abs=1e-7)
    assert got[0]["B02"]["std_p95"] == pytest.approx(np.percentile(std[0, 0][valid[0]], 95), abs=1e-7)


def test_auto_measures_on_the_host_for_a_cpu_and_a_wrong_setting_is_named():
    assert not on_device("auto", torch.device("cpu"))
    assert on_device("auto", torch.device("cuda"))
    assert on_device("device", torch.device("cpu")) and not on_device("host", torch.device("cuda"))
    with pytest.raises(ValueError, match="pixel_stats must be one of auto, device, host, got 'gpu'"):
        on_device("gpu", torch.device("cpu"))
