"""Scores of one tile against its truth, over the pixels that have data in every array compared.

Beside stage2.quality.compare (RMSE, PSNR, NDVI RMSE, edge preservation) the image restoration
field's standard pair, computed by torchmetrics so that the numbers mean what the literature's do:

- SSIM: `torchmetrics.functional.image.structural_similarity_index_measure` with its defaults
  (gaussian window, sigma 1.5, i.e. an 11 x 11 kernel; k1 0.01, k2 0.03; reflected borders), the
  mean of its map over the four bands and the pixels, and `data_range=1.0`: reflectance is in
  [0, 1], the peak PSNR uses too. torchmetrics' own default (None) would take each tile's
  max - min, which makes a dark tile's SSIM incomparable with a bright one's.
- SAM: `spectral_angle_mapper` per pixel (the angle between the two 4-band spectra), in degrees,
  averaged over the pixels. A pixel whose spectrum is all zero in either tile has no angle and is
  left out.

No data (NaN, nan_policy=mask) is never scored: RMSE, PSNR, NDVI RMSE and SAM use the valid pixels;
edge preservation the valid pixels whose 3 x 3 Sobel window is all valid, and SSIM those whose
11 x 11 window is (the crop keeps the fill out of every window). A tile without no data gets exactly
stage2.quality.compare's values and torchmetrics' SSIM of the whole tile.

torch and scipy are imported inside the functions that need them: `--help` and a failed read stay light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..quality import compare, edge_preservation, ndvi_rmse

SSIM_SIGMA = 1.5            # torchmetrics' default; its gaussian kernel is int(3.5 * sigma + 0.5) * 2 + 1 = 11 px
SSIM_RADIUS = 5             # half of that kernel: a pixel's SSIM sees 5 px on each side
SSIM_DATA_RANGE = 1.0       # reflectance [0, 1]
SSIM_ROWS = 512             # rows per torchmetrics call: a large tile's SSIM needs 5 float32 copies of the rows
SOBEL_RADIUS = 1
# Stage 1 tiles are float32 and so are the outputs; float64 keeps the sums of large tiles exact.
SUM_DTYPE = np.float64


@dataclass
class Sums:
    """What a tile adds to the pooled figures (all valid pixels of all tiles)."""

    sq_err: float = 0.0     # sum of squared reflectance errors over valid pixels and bands
    values: int = 0         # band values in that sum
    sam: float = 0.0        # sum of per-pixel angles (degrees)
    sam_pixels: int = 0

    def __iadd__(self, other: Sums) -> Sums:
        self.sq_err += other.sq_err
        self.values += other.values
        self.sam += other.sam
        self.sam_pixels += other.sam_pixels
        return self

    def rmse(self) -> float | None:
        return math.sqrt(self.sq_err / self.values) if self.values else None

    def sam_mean(self) -> float | None:
        return self.sam / self.sam_pixels if self.sam_pixels else None


def valid_pixels(*tiles: np.ndarray | None) -> np.ndarray | None:
    """(H, W) pixels finite in every band of every tile given; None when that is all of them."""
    valid = None
    for t in tiles:
        if t is None:
            continue
        ok = np.isfinite(t).all(axis=0)
        valid = ok if valid is None else valid & ok
    return None if valid is None or valid.all() else valid


def inner(valid: np.ndarray | None, radius: int) -> np.ndarray | None:
    """The valid pixels whose (2 radius + 1)^2 window holds valid pixels only; the tile's own border
    counts as valid (the metrics reflect the tile there, they do not read no data)."""
    if valid is None:
        return None
    from scipy.ndimage import binary_erosion

    return binary_erosion(valid, structure=np.ones((2 * radius + 1,) * 2, bool), border_value=1)


def score(truth: np.ndarray, estimate: np.ndarray, valid: np.ndarray | None) -> tuple[dict[str, float | None], Sums]:
    """RMSE, PSNR, NDVI RMSE, edge preservation, SSIM and SAM of `estimate` against `truth` (both
    (4, H, W)) over the `valid` pixels (None: all), and the tile's sums for the pooled figures."""
    if valid is not None and not valid.any():
        return dict.fromkeys(("rmse", "psnr", "ndvi_rmse", "edge_preservation", "ssim", "sam")), Sums()
    if valid is None:
        scores = compare(truth, estimate)
        d = np.asarray(estimate, SUM_DTYPE) - np.asarray(truth, SUM_DTYPE)
        sq, n = float(np.vdot(d, d)), d.size
    else:
        t, e = _filled(truth), _filled(estimate)
        d = e[:, valid].astype(SUM_DTYPE) - t[:, valid].astype(SUM_DTYPE)
        sq, n = float(np.vdot(d, d)), d.size
        r = math.sqrt(sq / n)
        edges = inner(valid, SOBEL_RADIUS)
        scores = {"rmse": r, "psnr": psnr_of(r), "ndvi_rmse": ndvi_rmse(t, e, valid),
                  "edge_preservation": edge_preservation(t, e, edges) if edges.any() else None}
        truth, estimate = t, e
    angle_sum, angle_n = sam_sums(truth, estimate, valid)
    scores["ssim"] = ssim(truth, estimate, valid)
    scores["sam"] = angle_sum / angle_n if angle_n else None
    return scores, Sums(sq, n, angle_sum, angle_n)


def psnr_of(rmse: float) -> float:
    """PSNR in dB for reflectance in [0, 1] (peak 1), as stage2.quality.psnr; inf for identical tiles."""
    return math.inf if rmse == 0 else 20.0 * math.log10(1.0 / rmse)


def rmse_over(truth: np.ndarray, estimate: np.ndarray, valid: np.ndarray | None) -> float | None:
    """Reflectance RMSE over the `valid` pixels (None: all); None when there are none."""
    if valid is None:
        d = np.asarray(estimate, SUM_DTYPE) - np.asarray(truth, SUM_DTYPE)
    else:
        d = np.asarray(estimate)[:, valid].astype(SUM_DTYPE) - np.asarray(truth)[:, valid].astype(SUM_DTYPE)
    return math.sqrt(float(np.mean(d * d))) if d.size else None


def ssim(truth: np.ndarray, estimate: np.ndarray, valid: np.ndarray | None = None) -> float | None:
    """torchmetrics' SSIM (module docstring) averaged over the bands and the pixels whose 11 x 11
    window is all valid; None when no pixel is.

    Taken SSIM_ROWS rows at a time, each with the 5 rows around it that its windows read: every
    pixel's value is the one of the whole tile, and a large tile never needs 5 copies of itself.
    """
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    keep = inner(valid, SSIM_RADIUS)
    h = truth.shape[1]
    total, n = 0.0, 0
    for r0 in range(0, h, SSIM_ROWS):
        r1 = min(r0 + SSIM_ROWS, h)
        s0, s1 = max(r0 - SSIM_RADIUS, 0), min(r1 + SSIM_RADIUS, h)
        t, e = (torch.from_numpy(np.ascontiguousarray(_filled(a[:, s0:s1]), dtype=np.float32))[None]
                for a in (truth, estimate))
        _, full = structural_similarity_index_measure(e, t, sigma=SSIM_SIGMA, data_range=SSIM_DATA_RANGE,
                                                      return_full_image=True)
        m = full[0, :, r0 - s0:r1 - s0].double().numpy()
        if keep is not None:
            m = m[:, keep[r0:r1]]
        total += float(m.sum())
        n += m.size
    return total / n if n else None


def sam_sums(truth: np.ndarray, estimate: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, int]:
    """Sum (degrees) and count of torchmetrics' per-pixel spectral angle over the valid pixels that
    have an angle (a spectrum of all zeros has none)."""
    import torch
    from torchmetrics.functional.image import spectral_angle_mapper

    total, n = 0.0, 0
    for r0 in range(0, truth.shape[1], SSIM_ROWS):
        r1 = min(r0 + SSIM_ROWS, truth.shape[1])
        # float64: in float32 the arccos of a cosine near 1 resolves only about 0.02 degrees
        t, e = (torch.from_numpy(np.asarray(a[:, r0:r1], dtype=np.float64))[None] for a in (truth, estimate))
        angle = spectral_angle_mapper(e, t, reduction="none")[0].numpy()
        ok = np.isfinite(angle) if valid is None else valid[r0:r1] & np.isfinite(angle)
        total += float(np.degrees(angle[ok]).sum())
        n += int(ok.sum())
    return total, n


def _filled(a: np.ndarray) -> np.ndarray:
    """`a` with NaN as 0: only where no score reads it (the scores keep to the valid pixels)."""
    return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0) if not np.isfinite(a).all() else a


# ---------------------------------------------------------------------------- does the std rank the error?
SPEARMAN_MAX_PIXELS = 1_000_000     # pixels ranked per tile and pooled: about 0.5 s of scipy's sorting
SPEARMAN_SEED = 0


def pixel_spread(std: np.ndarray, v2: np.ndarray, truth: np.ndarray, valid: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per valid pixel, the std and the error |opt_v2 - truth|, each the mean over the four bands:
    one pair per pixel, so that a band whose values are larger everywhere (NIR) does not make the
    ranking look better than it is where the user looks, on the map."""
    s = np.asarray(std, np.float32).mean(axis=0)
    e = np.abs(np.asarray(v2, np.float32) - np.asarray(truth, np.float32)).mean(axis=0)
    ok = np.isfinite(s) & np.isfinite(e)
    if valid is not None:
        ok &= valid
    return s[ok], e[ok]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """scipy.stats.spearmanr of the pairs; None with fewer than 3 or where either side is constant."""
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


class RankSample:
    """At most `cap` pixels drawn uniformly at random from every tile given, and from all of them.

    Each pixel gets a random key (one seeded generator, tiles in name order); a tile's sample is its
    `cap` smallest keys and the pooled sample the `cap` smallest of all tiles, which are among the
    tiles' own. So both are uniform samples, the same on every run, and memory stays at `cap` pixels
    whatever the number and size of the tiles.
    """

    def __init__(self, cap: int = SPEARMAN_MAX_PIXELS, seed: int = SPEARMAN_SEED) -> None:
        self.cap, self.rng = cap, np.random.default_rng(seed)
        self.keys = np.empty(0)
        self.pairs = np.empty((2, 0), np.float32)
        self.pixels = 0                         # pixels offered, before sampling

    def add(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offer one tile's pairs; returns its own sample (all of them up to `cap`)."""
        keys = self.rng.random(a.size)
        pairs = np.stack([a, b]).astype(np.float32)
        keys, pairs = _smallest(keys, pairs, self.cap)
        self.pixels += a.size
        self.keys, self.pairs = _smallest(np.concatenate([self.keys, keys]),
                                          np.concatenate([self.pairs, pairs], axis=1), self.cap)
        return pairs[0], pairs[1]

    def spearman(self) -> float | None:
        return spearman(self.pairs[0], self.pairs[1])


def _smallest(keys: np.ndarray, pairs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if keys.size <= k:
        return keys, pairs
    idx = np.argpartition(keys, k)[:k]
    return keys[idx], pairs[:, idx]
