"""The quality metrics of SPEC 7 against values worked out by hand, and the run summary's figures."""

import json
import math

import numpy as np
import pytest

from stage2.predict.summary import RunSummary, TileRecord, quality_summary
from stage2.quality import (
    EDGE_PRESERVATION_TARGET,
    NDVI_RMSE_TARGET,
    below_target,
    edge_preservation,
    ndvi,
    ndvi_rmse,
    severity,
    tile_quality,
)


def _tile(red, nir, h=10, w=10):
    """A (4, H, W) tile with the given Red (B04) and NIR (B08) planes; B02/B03 at 0.1."""
    t = np.full((4, h, w), 0.1, np.float32)
    t[2] = red
    t[3] = nir
    return t


def test_targets_are_the_guides():
    assert NDVI_RMSE_TARGET == 0.05 and EDGE_PRESERVATION_TARGET == 0.90


def test_ndvi_by_hand():
    t = _tile(0.1, 0.5, 2, 2)
    t[2, 0, 0] = t[3, 0, 0] = 0.0            # both 0: defined as 0, not NaN
    t[2, 1, 1], t[3, 1, 1] = 0.3, 0.1         # red above NIR: negative
    v = ndvi(t)
    assert v.shape == (2, 2)
    assert v[0, 1] == pytest.approx(0.4 / 0.6, abs=1e-7)    # (0.5 - 0.1) / (0.5 + 0.1)
    assert v[0, 0] == 0.0
    assert v[1, 1] == pytest.approx(-0.5, abs=1e-7)         # (0.1 - 0.3) / 0.4


def test_ndvi_rmse_by_hand():
    v1 = _tile(0.2, 0.6)                    # NDVI 0.5 everywhere
    assert ndvi_rmse(v1, v1) == 0.0
    v2 = v1.copy()
    v2[2, :, :5] = 0.3
    v2[3, :, :5] = 0.3                      # NDVI 0 on half the pixels
    # sqrt(mean of (0.5^2 on half, 0 on half)) = sqrt(0.125)
    assert ndvi_rmse(v1, v2) == pytest.approx(math.sqrt(0.125), abs=1e-6)
    assert ndvi_rmse(v2, v1) == pytest.approx(ndvi_rmse(v1, v2))


def test_edge_preservation_by_hand():
    # A vertical NIR step at column 5 of a 10x10 tile. Sobel along columns: 4 * (f[c+1] - f[c-1]),
    # so magnitude 4 on columns 4 and 5, 0 elsewhere (reflect mode adds nothing at the borders).
    step5 = np.zeros((10, 10))
    step5[:, 5:] = 1.0
    step6 = np.zeros((10, 10))
    step6[:, 6:] = 1.0                      # edge moved one pixel: magnitude on columns 5 and 6
    v1, v2 = _tile(0.1, step5), _tile(0.1, step6)
    # Two binary masks, each on 20 % of pixels, overlapping on 10 %:
    # r = (0.1 - 0.2 * 0.2) / (0.2 * 0.8) = 0.375
    assert edge_preservation(v1, v2) == pytest.approx(0.375, abs=1e-9)
    assert edge_preservation(v1, v1) == pytest.approx(1.0)
    # Pearson is scale-free: a half-contrast copy of the same edge preserves it fully.
    assert edge_preservation(v1, _tile(0.1, 0.5 * step5)) == pytest.approx(1.0)
    # Only the NIR band counts: changing the blue band changes nothing.
    v3 = v1.copy()
    v3[0] = np.random.default_rng(0).random((10, 10))
    assert edge_preservation(v1, v3) == pytest.approx(1.0)


def test_flat_tiles_give_null_never_nan():
    flat = _tile(0.2, 0.4, 32, 32)
    edged = flat.copy()
    edged[3, :, 16:] = 0.8
    for a, b in ((flat, flat), (flat, edged), (edged, flat)):
        q = tile_quality(a, b)
        assert q["edge_preservation"] is None
        assert q["ndvi_rmse"] is not None and math.isfinite(q["ndvi_rmse"])
        text = json.dumps(q, allow_nan=False)           # would raise on NaN
        assert '"edge_preservation": null' in text
    # All-zero tile: NDVI defined as 0, RMSE 0.
    zero = np.zeros((4, 16, 16), np.float32)
    assert tile_quality(zero, zero) == {"ndvi_rmse": 0.0, "edge_preservation": None}
    # Round-off-sized wiggles are still flat.
    wiggle = flat.copy()
    wiggle[3, 0, 0] += 1e-8
    assert edge_preservation(wiggle, wiggle) is None


def test_below_target_and_severity():
    assert not below_target({"ndvi_rmse": 0.049, "edge_preservation": 0.91})
    assert below_target({"ndvi_rmse": 0.05, "edge_preservation": 0.99})     # strict: < 0.05
    assert below_target({"ndvi_rmse": 0.01, "edge_preservation": 0.90})     # strict: > 0.90
    assert not below_target({"ndvi_rmse": 0.01, "edge_preservation": None})  # flat: not a miss
    assert severity({"ndvi_rmse": 0.1, "edge_preservation": 0.95}) == pytest.approx(2.0)
    assert severity({"ndvi_rmse": 0.01, "edge_preservation": 0.70}) == pytest.approx(3.0)
    assert severity({"ndvi_rmse": 0.025, "edge_preservation": None}) == pytest.approx(0.5)
    assert severity({"ndvi_rmse": None, "edge_preservation": None}) == -1.0


def test_quality_summary_mean_worst_counts():
    recs = [TileRecord("a", False, False, False, 0.01, 0.99),
            TileRecord("b", False, False, False, 0.08, 0.95),     # NDVI miss, worst RMSE
            TileRecord("c", False, False, False, 0.03, 0.60),     # edge miss, worst edge
            TileRecord("flat", False, False, False, 0.00, None)]  # undefined edge
    q = quality_summary(recs)
    assert q["tiles"] == 4 and q["below_target"] == 2 and q["undefined"] == 1
    assert q["ndvi_rmse"]["mean"] == pytest.approx(0.03)
    assert (q["ndvi_rmse"]["worst"], q["ndvi_rmse"]["worst_tile"]) == (0.08, "b")
    assert q["edge_preservation"]["mean"] == pytest.approx((0.99 + 0.95 + 0.60) / 3)
    assert (q["edge_preservation"]["worst"], q["edge_preservation"]["worst_tile"]) == (0.60, "c")
    text = json.dumps(q, allow_nan=False)
    assert "NaN" not in text
    s = RunSummary(processed=4, quality=q).format()
    assert "2 tiles below target, 1 undefined (flat)" in s and "(b)" in s and "(c)" in s


def test_quality_summary_all_flat_is_null():
    q = quality_summary([TileRecord("flat", False, False, False, 0.0, None)])
    assert q["edge_preservation"]["mean"] is None and q["edge_preservation"]["worst_tile"] is None
    json.dumps(q, allow_nan=False)


@pytest.mark.parametrize("block_side", [256, 100])
def test_metrics_of_a_large_tile_taken_in_blocks_equal_the_whole_tile_formula(block_side, monkeypatch):
    """A 700 x 900 tile is 12 metric blocks (63 of 100 px); its metrics equal the formulas over the
    whole tile, Sobel included (scipy.ndimage's definition), also over a subset of valid pixels."""
    from scipy import ndimage

    from stage2.quality import NIR, edge_preservation, ndvi, ndvi_rmse, sobel_magnitude

    monkeypatch.setattr("stage2.quality.BLOCK_SIDE", block_side)
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:700, 0:900] / 100.0
    v1 = (0.3 + 0.2 * np.sin(yy)[None] * np.cos(xx)[None] + rng.normal(0, 0.02, (4, 700, 900))).astype(np.float32)
    v2 = (v1 + rng.normal(0, 0.01, v1.shape)).astype(np.float32)
    assert 700 * 900 > 4 * block_side**2
    ref = [np.hypot(ndimage.sobel(v[NIR], axis=0), ndimage.sobel(v[NIR], axis=1)) for v in (v1, v2)]
    assert np.abs(sobel_magnitude(v1[NIR]) - ref[0]).max() <= 1e-6
    valid = np.ones((700, 900), dtype=bool)
    valid[:, :250] = False
    for mask in (None, valid):
        m = np.ones((700, 900), dtype=bool) if mask is None else mask
        d = (ndvi(v1) - ndvi(v2))[m].astype(np.float64)
        assert ndvi_rmse(v1, v2, mask) == pytest.approx(np.sqrt(np.mean(d * d)), rel=1e-9)
        a, b = (r[m].astype(np.float64) for r in ref)
        assert edge_preservation(v1, v2, mask) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-6)


@pytest.mark.parametrize("strips", [[700], [256, 300, 144], [16, 17, 1, 666], [1, 1, 698]])
def test_quality_given_strip_by_strip_equals_the_whole_tile(strips):
    """RowQuality (windowed tiles, whose output replaces their input strip by strip) gives tile_quality."""
    from stage2.quality import RowQuality

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:700, 0:600] / 80.0
    v1 = (0.3 + 0.2 * np.sin(yy)[None] * np.cos(xx)[None] + rng.normal(0, 0.02, (4, 700, 600))).astype(np.float32)
    v2 = (v1 + rng.normal(0, 0.01, v1.shape)).astype(np.float32)
    valid = np.ones((700, 600), dtype=bool)
    valid[:, :200] = False
    for mask in (None, valid):
        rq, r, a, b = RowQuality(), 0, v1.copy(), v2.copy()
        for n in strips:
            rq.add(a[:, r:r + n], b[:, r:r + n], None if mask is None else mask[r:r + n])
            a[:, r:r + n], b[:, r:r + n] = 0.5, 0.25      # as a windowed tile's rows are overwritten
            r += n
        got, want = rq.finish(), tile_quality(v1, v2, mask)
        assert got["ndvi_rmse"] == pytest.approx(want["ndvi_rmse"], rel=1e-9)
        assert got["edge_preservation"] == pytest.approx(want["edge_preservation"], abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sobel_magnitude_is_bit_identical_to_the_plain_formula(dtype):
    """The buffered Sobel (a speed-up of issue 16) must not change a single quality value in any JSON."""
    from stage2.quality import sobel_magnitude

    band = np.random.default_rng(3).random((67, 45)).astype(dtype)
    p = np.pad(band, 1, mode="symmetric")
    across, down = p[:-2] + 2 * p[1:-1] + p[2:], p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]
    ref = np.hypot(across[:, 2:] - across[:, :-2], down[2:] - down[:-2])
    got = sobel_magnitude(band)
    assert got.dtype == dtype and np.array_equal(got, ref)


# ------------------------------------------------------------------ the CPU and device forms (SPEC 12)
# Every form equals the reference (stage2.quality.reference_*, the definition) within 1e-5; measured
# differences are about 1e-8 (sqrt for hypot in the Sobel magnitude, float32 per pixel).
TOL = 1e-5
REAL = ("hydro_patch_100", "mtom_t48que_20200223_r300_c800_256x256", "ben1_20170617_4_55")


def _real(name: str) -> np.ndarray:
    from pathlib import Path

    return np.load(Path(__file__).resolve().parents[2] / "examples" / "demo_aoi" / f"{name}.npz")["opt_v1"]


def _refined(v1: np.ndarray, seed: int = 0) -> np.ndarray:
    """v1 as a refinement changes it: a little blur of NIR, reflectance noise, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    v2 = v1 + rng.normal(0, 0.005, v1.shape)
    v2[3, 1:-1] = 0.5 * v2[3, 1:-1] + 0.25 * (v2[3, :-2] + v2[3, 2:])
    return np.clip(v2, 0, 1).astype(v1.dtype)


def _cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """(name, v1, v2, valid): random, real, real with a NaN swath (filled, as the writer gets it),
    tiny, non-square, multi-block, float64 and constant tiles."""
    from stage2.nodata import fill_nearest

    rng = np.random.default_rng(7)
    cases = []
    for shape in ((256, 256), (16, 16), (2, 2), (2, 9), (37, 300), (300, 37), (513, 260)):
        v1 = rng.random((4, *shape), dtype=np.float32)
        cases.append((f"random {shape}", v1, _refined(v1), None))
        cases.append((f"random {shape} masked", v1, _refined(v1), rng.random(shape) > 0.3))
    for name in REAL:
        v1 = _real(name)
        cases.append((name, v1, _refined(v1), None))
        swath = v1.copy()
        swath[:, :, : v1.shape[2] // 3] = np.nan                 # a no-data swath edge, nan_policy=mask
        swath[:, 40:52, 100:110] = np.nan
        nodata = np.isnan(swath).any(axis=0)
        fill_nearest(swath, nodata)
        cases.append((f"{name} no-data", swath, _refined(swath), ~nodata))
    real = _real(REAL[1])
    cases.append(("real float64", real.astype(np.float64), _refined(real.astype(np.float64)), None))
    cases.append(("real, v2 float64", real, _refined(real).astype(np.float64), None))
    flat = np.full((4, 64, 48), 0.25, np.float32)
    cases.append(("constant", flat, flat.copy(), None))
    cases.append(("constant against real", flat, real[:, :64, :48].copy(), None))
    cases.append(("constant masked", flat, flat + np.float32(0.1), rng.random((64, 48)) > 0.5))
    return cases


CASES = _cases()


def _assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        if w is None:
            assert g is None, k
        elif math.isnan(w):
            assert g is not None and math.isnan(g), k
        else:
            assert g == pytest.approx(w, abs=TOL), k


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_cpu_form_equals_the_reference(case):
    from stage2.quality import edge_preservation, ndvi_rmse, reference_tile_quality, tile_quality

    _, v1, v2, valid = case
    want = reference_tile_quality(v1, v2, valid)
    got = tile_quality(v1, v2, valid)
    _assert_close(got, want)
    assert got == {"ndvi_rmse": ndvi_rmse(v1, v2, valid), "edge_preservation": edge_preservation(v1, v2, valid)}
    json.dumps(got, allow_nan=False)
    if want["edge_preservation"] is not None:
        assert got["edge_preservation"] == pytest.approx(want["edge_preservation"], abs=1e-7)   # measured: 5e-8


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_strip_by_strip_form_equals_the_reference(case):
    from stage2.quality import RowQuality, reference_tile_quality

    _, v1, v2, valid = case
    rq, r = RowQuality(), 0
    for n in (1, 7, 1000):
        rq.add(v1[:, r:r + n], v2[:, r:r + n], None if valid is None else valid[r:r + n])
        r += n
    _assert_close(rq.finish(), reference_tile_quality(v1, v2, valid))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(256, 256), (2, 2), (2, 9), (9, 2), (67, 45)])
def test_the_fast_sobel_has_the_reference_gradients_bit_for_bit(shape, dtype):
    """Its gx and gy are the plain formula's, bit for bit; only sqrt(gx^2 + gy^2) replaces hypot."""
    from stage2.quality import _sobel_fast, sobel_magnitude

    band = np.random.default_rng(5).random(shape).astype(dtype)
    p = np.pad(band, 1, mode="symmetric")
    across, down = p[:-2] + 2 * p[1:-1] + p[2:], p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]
    gx, gy = across[:, 2:] - across[:, :-2], down[2:] - down[:-2]
    got = _sobel_fast(band)
    assert got.dtype == dtype and np.array_equal(got, np.sqrt(gx * gx + gy * gy))
    assert np.allclose(got, sobel_magnitude(band), rtol=4 * np.finfo(dtype).eps, atol=0)
    one_row = band[:1]
    assert np.array_equal(_sobel_fast(one_row), sobel_magnitude(one_row))      # below 2 px: the reference


def test_nan_keeps_the_references_behaviour():
    """NaN on a measured pixel gives NaN, as the reference does (the report reads outputs with NaN);
    NaN only outside `valid` is not measured; NaN never becomes None."""
    from stage2.quality import RowQuality, reference_tile_quality, tile_quality

    v1 = _real(REAL[0])
    v2 = _refined(v1)
    v2[:, 10:20, 30:40] = np.nan
    for got in (tile_quality(v1, v2), reference_tile_quality(v1, v2)):
        assert math.isnan(got["ndvi_rmse"]) and math.isnan(got["edge_preservation"])
    valid = np.ones(v1.shape[1:], dtype=bool)
    valid[9:21, 29:41] = False            # the NaN and the pixels whose Sobel reads them
    want = reference_tile_quality(v1, v2, valid)
    assert math.isfinite(want["ndvi_rmse"]) and math.isfinite(want["edge_preservation"])
    _assert_close(tile_quality(v1, v2, valid), want)
    rq = RowQuality()
    rq.add(v1, v2, valid)
    _assert_close(rq.finish(), want)


def test_importing_quality_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, stage2.quality; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ the device form, on CPU tensors
def _batch(cases):
    torch = pytest.importorskip("torch")
    v1 = torch.from_numpy(np.stack([c[1] for c in cases]))
    v2 = torch.from_numpy(np.stack([c[2] for c in cases]))
    masks = [c[3] for c in cases]
    valid = None if all(m is None for m in masks) else torch.from_numpy(
        np.stack([np.ones(cases[0][1].shape[1:], bool) if m is None else m for m in masks]))
    return v1, v2, valid


def _same_shape_batches():
    groups: dict = {}
    for c in CASES:
        groups.setdefault((c[1].shape, c[1].dtype, c[2].dtype), []).append(c)
    return list(groups.values())


@pytest.mark.parametrize("cases", _same_shape_batches(), ids=lambda cs: " + ".join(c[0] for c in cs))
def test_the_device_form_equals_the_reference(cases):
    from stage2.quality import batch_quality_torch, reference_tile_quality

    got = batch_quality_torch(*_batch(cases))
    assert len(got) == len(cases)
    for g, (_, v1, v2, valid) in zip(got, cases, strict=True):
        _assert_close(g, reference_tile_quality(v1, v2, valid))
        json.dumps(g, allow_nan=False)


def test_the_device_form_takes_half_precision_and_keeps_nan():
    torch = pytest.importorskip("torch")
    from stage2.quality import batch_quality_torch, reference_tile_quality

    v1 = _real(REAL[1])
    v2 = _refined(v1)
    half = batch_quality_torch(torch.from_numpy(v1)[None].half(), torch.from_numpy(v2)[None].half())[0]
    want = reference_tile_quality(v1.astype(np.float16), v2.astype(np.float16))
    _assert_close(half, want)
    v2[:, 5, 5] = np.nan
    got = batch_quality_torch(torch.from_numpy(v1)[None], torch.from_numpy(v2)[None])[0]
    assert math.isnan(got["ndvi_rmse"]) and math.isnan(got["edge_preservation"])
    valid = np.ones(v1.shape[1:], bool)
    valid[4:7, 4:7] = False
    got = batch_quality_torch(torch.from_numpy(v1)[None], torch.from_numpy(v2)[None], torch.from_numpy(valid)[None])
    _assert_close(got[0], reference_tile_quality(v1, v2, valid))


def _assert_band_stats(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for band, w in want.items():
        g = got[band]
        assert g["count"] == w["count"]
        for k in ("mean", "std", "min", "max"):
            assert (g[k] is None) if w[k] is None else g[k] == pytest.approx(w[k], abs=TOL)


def test_the_device_change_and_band_stats_equal_the_numpy_forms():
    pytest.importorskip("torch")
    from stage2.predict.confidence import ChangeSum
    from stage2.product import band_stats
    from stage2.quality import batch_band_stats_torch, batch_change_torch

    cases = [c for c in CASES if c[1].shape == (4, 256, 256) and c[1].dtype == np.float32 and c[2].dtype == np.float32]
    v1, v2, valid = _batch(cases)
    valid[-1] = False                     # a tile with no valid pixel: None, as ChangeSum and band_stats give
    changes = batch_change_torch(v1, v2, valid)
    stats = batch_band_stats_torch(v2, valid)
    for i in range(len(cases)):
        ok = valid[i].numpy()
        change = ChangeSum()
        change.add(v1[i].numpy(), v2[i].numpy(), ok)
        want = band_stats(np.where(ok, v2[i].numpy(), np.nan))       # the writer's NaN outside `valid`
        if change.mean is None:
            assert changes[i] is None
        else:
            assert changes[i] == pytest.approx(change.mean, abs=TOL)
        _assert_band_stats(stats[i], want)
    assert batch_change_torch(v1, v2) == pytest.approx(
        [float(np.abs(b - a).mean(dtype=np.float64)) for a, b in zip(v1.numpy(), v2.numpy(), strict=True)], abs=TOL)
    with_nan = v2.clone()
    with_nan[0, 1, :10] = float("nan")    # NaN in one band only: that band's count drops, as band_stats
    _assert_band_stats(batch_band_stats_torch(with_nan)[0], band_stats(with_nan[0].numpy()))
