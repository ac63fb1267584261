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


@pytest.mark.parametrize("cache_pixels", [0, 1 << 22])
def test_metrics_of_a_large_tile_taken_in_blocks_equal_the_whole_tile_formula(cache_pixels, monkeypatch):
    """A 700 x 900 tile is 12 metric blocks; its metrics equal the formulas over the whole tile,
    Sobel included (scipy.ndimage's definition), also over a subset of valid pixels."""
    from scipy import ndimage

    from stage2.quality import BLOCK_SIDE, NIR, edge_preservation, ndvi, ndvi_rmse, sobel_magnitude

    monkeypatch.setattr("stage2.quality.CACHE_PIXELS", cache_pixels)    # Sobel kept between passes, or not
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:700, 0:900] / 100.0
    v1 = (0.3 + 0.2 * np.sin(yy)[None] * np.cos(xx)[None] + rng.normal(0, 0.02, (4, 700, 900))).astype(np.float32)
    v2 = (v1 + rng.normal(0, 0.01, v1.shape)).astype(np.float32)
    assert 700 * 900 > 4 * BLOCK_SIDE**2
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
