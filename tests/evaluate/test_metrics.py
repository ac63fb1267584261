"""SSIM and SAM as evaluate reports them, against independent NumPy/SciPy references, with and without no data.

The references are written out here from the definitions (Wang et al. 2004 with an 11 x 11 gaussian
window of sigma 1.5, mirrored borders, constants for a data range of 1; the angle between spectra),
so a change of torchmetrics' defaults or of how evaluate calls it fails here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from stage2.evaluate import metrics
from stage2.quality import compare


def _pair(h: int = 40, w: int = 36, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 10
    truth = np.stack([0.2 + 0.1 * k + 0.1 * np.sin(xx + k) * np.cos(yy) for k in range(4)])
    truth = np.clip(truth + rng.normal(0, 0.01, truth.shape), 0, 1).astype(np.float32)
    estimate = np.clip(truth * 1.05 + rng.normal(0, 0.02, truth.shape), 0, 1).astype(np.float32)
    return truth, estimate


def ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per band and pixel SSIM of (4, H, W) tiles: gaussian window sigma 1.5 (11 px), mirrored borders, L = 1."""
    r = np.arange(-5, 6)
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.correlate1d(ndimage.correlate1d(a, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64), strict=True):
        ma, mb = blur(a), blur(b)
        saa, sbb, sab = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
        out.append((2 * ma * mb + c1) * (2 * sab + c2) / ((ma ** 2 + mb ** 2 + c1) * (saa + sbb + c2)))
    return np.stack(out)


def sam_degrees(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per pixel angle (degrees) between the 4-band spectra of two (4, H, W) tiles."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    with np.errstate(invalid="ignore"):           # a spectrum of zeros has no angle: NaN
        cos = (x * y).sum(0) / (np.linalg.norm(x, axis=0) * np.linalg.norm(y, axis=0))
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def test_ssim_is_torchmetrics_default_gaussian_with_reflectance_range_and_matches_the_definition(monkeypatch):
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    truth, est = _pair()
    got = metrics.ssim(truth, est)
    assert got == pytest.approx(ssim_map(est, truth).mean(), abs=1e-5)
    tm = structural_similarity_index_measure(torch.from_numpy(est)[None], torch.from_numpy(truth)[None],
                                             data_range=1.0)
    assert got == pytest.approx(float(tm), abs=1e-6)
    # torchmetrics' own default data range (the tiles' max - min) gives another number: evaluate does not use it
    assert abs(float(structural_similarity_index_measure(torch.from_numpy(est)[None],
                                                         torch.from_numpy(truth)[None])) - got) > 1e-3
    # taken 16 rows at a time (a large tile's way), every pixel keeps the whole tile's value
    monkeypatch.setattr(metrics, "SSIM_ROWS", 16)
    assert metrics.ssim(truth, est) == pytest.approx(got, abs=1e-6)
    assert metrics.ssim(truth, truth) == pytest.approx(1.0, abs=1e-6)


def test_sam_is_the_mean_angle_in_degrees_and_leaves_out_pixels_without_a_spectrum():
    truth, est = _pair()
    est[:, 0, 0] = 0.0                                  # no spectrum, no angle
    total, n = metrics.sam_sums(truth, est)
    ref = sam_degrees(est, truth)
    assert n == truth[0].size - 1
    assert total / n == pytest.approx(np.nanmean(ref), rel=1e-9)
    scores, sums = metrics.score(truth, est, None)
    assert scores["sam"] == pytest.approx(np.nanmean(ref), rel=1e-9) and sums.sam_pixels == n


def test_a_tile_without_no_data_keeps_the_quality_scores():
    truth, est = _pair()
    scores, sums = metrics.score(truth, est, None)
    assert {k: scores[k] for k in ("rmse", "psnr", "ndvi_rmse", "edge_preservation")} == compare(truth, est)
    d = est.astype(np.float64) - truth
    assert sums.values == d.size and sums.sq_err == pytest.approx((d * d).sum(), rel=1e-12)


def test_no_data_is_never_scored_and_ssim_keeps_the_fill_out_of_its_windows():
    truth, est = _pair(48, 40)
    est[:, 10:20, 5:15] = np.nan                        # no data in the output (nan_policy=mask)
    truth[:, 40:, 30:] = np.nan                         # and a corner the truth lacks
    valid = metrics.valid_pixels(truth, est)
    assert valid.sum() == 48 * 40 - 100 - 8 * 10
    scores, sums = metrics.score(truth, est, valid)

    d = (est - truth.astype(np.float64))[:, valid]
    assert scores["rmse"] == pytest.approx(math.sqrt(np.mean(d * d)), rel=1e-12)
    assert scores["psnr"] == pytest.approx(-20 * math.log10(scores["rmse"]), rel=1e-12)
    assert sums.values == 4 * valid.sum()
    assert scores["sam"] == pytest.approx(sam_degrees(est, truth)[valid].mean(), rel=1e-9)
    # SSIM: the pixels whose 11 x 11 window has data everywhere; the value of the map there does not
    # depend on what fills the no data, and equals the definition's
    far = ndimage.binary_erosion(valid, np.ones((11, 11), bool), border_value=1)
    filled = [np.where(np.isnan(a), 0.0, a) for a in (truth, est)]
    assert scores["ssim"] == pytest.approx(ssim_map(filled[1], filled[0])[:, far].mean(), abs=1e-5)
    other = [np.where(np.isnan(a), 0.7, a) for a in (truth, est)]
    assert metrics.ssim(*other, valid) == pytest.approx(scores["ssim"], abs=1e-6)
    assert all(v is not None and math.isfinite(v) for v in scores.values())


def test_a_tile_with_no_valid_pixel_scores_none():
    truth, est = _pair(16, 16)
    est[:] = np.nan
    scores, sums = metrics.score(truth, est, metrics.valid_pixels(truth, est))
    assert set(scores.values()) == {None} and sums.values == 0


def test_scattered_data_has_per_pixel_scores_but_no_window_scores():
    """Every other pixel has data: no 3 x 3 or 11 x 11 window is whole, so edge preservation and SSIM are None."""
    truth, est = _pair(16, 16)
    est[:, ::2, ::2] = np.nan
    scores, _ = metrics.score(truth, est, metrics.valid_pixels(truth, est))
    assert scores["edge_preservation"] is None and scores["ssim"] is None
    assert all(scores[k] is not None for k in ("rmse", "psnr", "ndvi_rmse", "sam"))
