"""Quality checks of the Stage 2 guide, computed for every tile (SPEC 7).

- NDVI preservation: RMSE between the NDVI of opt_v1 and of opt_v2 (target < 0.05): refinement
  must not change the vegetation signal Stage 3 relies on.
- Edge preservation: Pearson correlation of the Sobel gradient magnitude of the NIR band of
  opt_v1 and opt_v2 (target > 0.90): refinement must not blur or invent field boundaries.
- Against a truth (`compare`: RMSE, PSNR, and both of the above), for stage2.evaluate and the
  training validation.

Pure numpy/scipy so the writer threads and the report can use it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

NDVI_RMSE_TARGET = 0.05          # ndvi_rmse below this is good
EDGE_PRESERVATION_TARGET = 0.90  # edge_preservation above this is good
EPS = 1e-8
# A Sobel magnitude whose standard deviation is below this (reflectance units) has no edges to
# compare: Sentinel-2 is quantised at 1e-4, so anything smaller is float round-off, and Pearson's r
# of round-off is noise. Such tiles get edge_preservation = None (JSON null) and are counted as flat.
FLAT_STD = 1e-6
RED, NIR = 2, 3                  # band indices in [B02, B03, B04, B08]
# Scores against a truth (stage2.train.evaluate, training validation), and which way is better.
METRICS = ("rmse", "psnr", "ndvi_rmse", "edge_preservation")
LOWER_IS_BETTER = {"rmse": True, "psnr": False, "ndvi_rmse": True, "edge_preservation": False}


def _float(a: np.ndarray) -> np.ndarray:
    """float32 for tiles (their own precision: twice as fast as float64 and equal to ~1e-9 in the
    metrics); float64 input stays float64."""
    a = np.asarray(a)
    return a if a.dtype == np.float64 else a.astype(np.float32, copy=False)


def ndvi(opt: np.ndarray) -> np.ndarray:
    """(NIR - Red) / (NIR + Red + 1e-8) per pixel of a (4, H, W) tile; 0 where both are 0."""
    opt = _float(opt)
    nir, red = opt[NIR], opt[RED]
    return (nir - red) / (nir + red + EPS)


def ndvi_rmse(v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Root-mean-square difference of the two tiles' NDVI over the `valid` pixels (all by default).

    Accumulated in float64 over blocks, so a large tile needs no tile-sized temporaries.
    """
    v1, v2 = np.asarray(v1), np.asarray(v2)
    total, n = 0.0, 0
    for r0, r1, c0, c1 in _blocks(v1.shape):
        d = ndvi(v1[:, r0:r1, c0:c1]) - ndvi(v2[:, r0:r1, c0:c1])
        if valid is not None:
            d = d[valid[r0:r1, c0:c1]]
        total += float(np.sum(d * d, dtype=np.float64))
        n += d.size
    return math.sqrt(total / n)


def sobel_magnitude(band: np.ndarray) -> np.ndarray:
    """Gradient magnitude hypot(sobel axis 0, sobel axis 1) of one (H, W) band.

    scipy.ndimage.sobel's kernels ([1, 2, 1] smoothing, [-1, 0, 1] difference) and border (its
    'reflect', numpy's 'symmetric'), written as array slices: the same values within float32
    rounding (7e-7), 2x faster on 256 px tiles and 6x on 64-row blocks of a 4096 px tile (ndimage's
    pass along axis 0 walks the array across its rows).
    """
    p = np.pad(_float(band), 1, mode="symmetric")
    # (a + 2b) + c in that order, into buffers: the same values as the plain expression, in 0.6x its
    # time (fewer temporaries; 256 px: 0.79 -> 0.50 ms, bench_datapath's largest quality cost)
    across = np.add(p[:-2], np.multiply(p[1:-1], 2))       # smoothed along axis 0
    np.add(across, p[2:], out=across)
    down = np.add(p[:, :-2], np.multiply(p[:, 1:-1], 2))   # smoothed along axis 1
    np.add(down, p[:, 2:], out=down)
    gx = np.subtract(across[:, 2:], across[:, :-2])
    return np.hypot(gx, np.subtract(down[2:], down[:-2]), out=gx)


def edge_preservation(v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None) -> float | None:
    """Pearson r of the NIR Sobel magnitudes of the two tiles, over the `valid` pixels (all by default).

    None where either magnitude is flat (std < FLAT_STD): r is 0/0 there, and NaN must never reach
    a JSON file. A large tile is taken in blocks (means first, then centred sums), each block's
    Sobel computed with one pixel of its neighbours around it, so the values are the whole tile's.
    """
    blocks = _blocks(np.shape(v1))
    cached = None
    if len(blocks) == 1 or np.shape(v1)[-1] * np.shape(v1)[-2] <= CACHE_PIXELS:
        cached = [_sobel_pair(v1, v2, valid, b) for b in blocks]

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return iter(cached) if cached is not None else (_sobel_pair(v1, v2, valid, b) for b in blocks)

    n, sa, sb = 0, 0.0, 0.0
    for a, b in pairs():
        n, sa, sb = n + a.size, sa + float(a.sum()), sb + float(b.sum())
    ma, mb = sa / n, sb / n
    saa = sbb = sab = 0.0
    for a, b in pairs():
        a, b = a - ma, b - mb
        # einsum, not a @ b: BLAS may start its own threads for a dot this long, which only
        # competes with the model for cores (this runs in the writer threads during inference).
        saa += float(np.einsum("i,i->", a, a))
        sbb += float(np.einsum("i,i->", b, b))
        sab += float(np.einsum("i,i->", a, b))
    if min(saa, sbb) < n * FLAT_STD**2:
        return None
    return float(np.clip(sab / math.sqrt(saa * sbb), -1.0, 1.0))


# Large tiles are measured in squares of BLOCK_SIDE px (a 256 px tile is one), which stay in the CPU's
# cache. Measured on the 2 shared cores under load, for the pixels of a 4096 px tile: the NIR Sobel
# took 1.5-1.9 s in 64-row blocks, 0.58-0.68 s in 256 px squares and 0.42-0.64 s as 256 px tiles;
# NDVI RMSE 0.9-1.1 s, 0.33-0.40 s and 0.15-0.19 s. Up to CACHE_PIXELS, the magnitudes of the
# first pass (means) are kept for the second (centred sums): 64 MiB at most.
BLOCK_SIDE = 256
CACHE_PIXELS = 1 << 22


def _blocks(shape: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    h, w = shape[-2:]
    return [(r, min(r + BLOCK_SIDE, h), c, min(c + BLOCK_SIDE, w))
            for r in range(0, h, BLOCK_SIDE) for c in range(0, w, BLOCK_SIDE)]


def _sobel_pair(v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None, block: tuple[int, int, int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """NIR Sobel magnitudes of one block of both tiles, as flat float64 arrays of its valid pixels."""
    r0, r1, c0, c1 = block
    h, w = np.shape(v1)[-2:]
    s0, s1, t0, t1 = max(r0 - 1, 0), min(r1 + 1, h), max(c0 - 1, 0), min(c1 + 1, w)   # the 3x3 kernel's context
    out = []
    for v in (v1, v2):
        mag = sobel_magnitude(np.asarray(v)[NIR, s0:s1, t0:t1])[r0 - s0:r1 - s0, c0 - t0:c1 - t0]
        out.append((mag if valid is None else mag[valid[r0:r1, c0:c1]]).ravel().astype(np.float64))
    return out[0], out[1]


class RowQuality:
    """tile_quality of a tile given top to bottom, one final strip of rows at a time.

    For a windowed tile whose output replaces its input strip by strip (stage2.predict.windows):
    each strip is measured as it becomes final, with the last two rows of the strip before kept as
    the Sobel's context (its own last row is measured with the next strip, whose first row it needs).
    Pearson's r comes from sums of values shifted by the first strip's means (float64), so one pass
    suffices; it equals edge_preservation within float rounding (1e-12).
    """

    def __init__(self) -> None:
        self.n_ndvi, self.ndvi_sq = 0, 0.0
        self.n, self.shift = 0, None
        self.sums = np.zeros(5)           # a, b, a*a, b*b, a*b of the shifted magnitudes
        self._prev: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None   # last 2 NIR rows, valid

    def add(self, v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None) -> None:
        """The next strip of rows, (4, r, W) each, final; `valid` (r, W) as in tile_quality."""
        d = ndvi(v1) - ndvi(v2)
        d = d if valid is None else d[valid]
        self.n_ndvi += d.size
        self.ndvi_sq += float(np.sum(d * d, dtype=np.float64))
        nir = [np.asarray(v)[NIR] for v in (v1, v2)]
        if self._prev is None:
            stack, ok, first = nir, valid, 0              # the tile's top edge: no context row above
        else:
            p1, p2, pv = self._prev
            stack = [np.concatenate((p1, nir[0])), np.concatenate((p2, nir[1]))]
            ok = None if valid is None else np.concatenate((pv, valid))
            first = p1.shape[0] - 1                       # the row held back last time; any row above is context
        self._measure(stack, ok, first, stack[0].shape[0] - 1)
        # copies: the caller may overwrite these rows (a windowed tile writes its output over its input)
        self._prev = (stack[0][-2:].copy(), stack[1][-2:].copy(), None if ok is None else ok[-2:].copy())

    def finish(self) -> dict[str, float | None]:
        """Measure the last row (the tile's bottom edge) and return the `quality` object."""
        if self._prev is not None:
            p1, p2, pv = self._prev
            self._measure([p1, p2], pv, p1.shape[0] - 1, p1.shape[0])
        sa, sb, saa, sbb, sab = self.sums
        n = self.n
        caa, cbb, cab = saa - sa * sa / n, sbb - sb * sb / n, sab - sa * sb / n
        edge = None if min(caa, cbb) < n * FLAT_STD**2 else float(np.clip(cab / math.sqrt(caa * cbb), -1.0, 1.0))
        return {"ndvi_rmse": math.sqrt(self.ndvi_sq / self.n_ndvi), "edge_preservation": edge}

    def _measure(self, stack: list[np.ndarray], valid: np.ndarray | None, r0: int, r1: int) -> None:
        """Add the Sobel magnitudes of rows r0:r1 of the stacked NIR rows (their neighbours are in it)."""
        h, w = stack[0].shape
        s0, s1 = max(r0 - 1, 0), min(r1 + 1, h)
        for c0 in range(0, w, BLOCK_SIDE):
            c1 = min(c0 + BLOCK_SIDE, w)
            t0, t1 = max(c0 - 1, 0), min(c1 + 1, w)
            a, b = (sobel_magnitude(x[s0:s1, t0:t1])[r0 - s0:r1 - s0, c0 - t0:c1 - t0] for x in stack)
            if valid is not None:
                a, b = a[valid[r0:r1, c0:c1]], b[valid[r0:r1, c0:c1]]
            a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
            if a.size == 0:
                continue
            if self.shift is None:
                self.shift = (float(a.mean()), float(b.mean()))
            a, b = a - self.shift[0], b - self.shift[1]
            self.n += a.size
            self.sums += [a.sum(), b.sum(), np.einsum("i,i->", a, a), np.einsum("i,i->", b, b),
                          np.einsum("i,i->", a, b)]


def tile_quality(v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float | None]:
    """The per-tile `quality` object of the output JSON (plain floats or None: JSON-safe).

    `valid` (H, W) bool limits both metrics to those pixels (nan_policy=mask: the others are no data).
    """
    return {"ndvi_rmse": ndvi_rmse(v1, v2, valid), "edge_preservation": edge_preservation(v1, v2, valid)}


def below_target(q: dict[str, float | None]) -> bool:
    """True when a tile misses either target (an undefined metric does not count as missing).

    Missing means ndvi_rmse >= 0.05 or edge_preservation <= 0.90: the targets are strict.
    """
    r, e = q.get("ndvi_rmse"), q.get("edge_preservation")
    return (r is not None and r >= NDVI_RMSE_TARGET) or (e is not None and e <= EDGE_PRESERVATION_TARGET)


def severity(q: dict[str, float | None]) -> float:
    """How far a tile is from its targets, for "worst first" ordering: > 1 means below target.

    max(ndvi_rmse / 0.05, (1 - edge_preservation) / (1 - 0.90)); an undefined metric adds
    nothing, and a tile with no defined metric sorts last (-1).
    """
    parts = []
    r, e = q.get("ndvi_rmse"), q.get("edge_preservation")
    if r is not None:
        parts.append(r / NDVI_RMSE_TARGET)
    if e is not None:
        parts.append((1.0 - e) / (1.0 - EDGE_PRESERVATION_TARGET))
    return max(parts) if parts else -1.0


def rmse(truth: np.ndarray, estimate: np.ndarray) -> float:
    d = np.asarray(estimate, np.float64) - np.asarray(truth, np.float64)
    return float(np.sqrt(np.mean(d * d)))


def psnr(truth: np.ndarray, estimate: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for reflectance in [0, 1] (peak 1); inf for identical tiles."""
    return _psnr_from_rmse(rmse(truth, estimate))


def _psnr_from_rmse(e: float) -> float:
    return math.inf if e == 0 else 20.0 * math.log10(1.0 / e)


def compare(truth: np.ndarray, estimate: np.ndarray) -> dict[str, float | None]:
    """RMSE, PSNR, NDVI RMSE and edge preservation of `estimate` against `truth`, both (4, H, W)."""
    if np.shape(truth) != np.shape(estimate):
        raise ValueError(f"shapes differ: truth {np.shape(truth)}, estimate {np.shape(estimate)}")
    e = rmse(truth, estimate)
    return {"rmse": e, "psnr": _psnr_from_rmse(e),
            "ndvi_rmse": ndvi_rmse(truth, estimate), "edge_preservation": edge_preservation(truth, estimate)}
