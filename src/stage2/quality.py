"""Quality checks of the Stage 2 guide, computed for every tile (docs/usage.md#quality).

- NDVI preservation: RMSE between the NDVI of opt_v1 and of opt_v2 (target < 0.05): refinement
  must not change the vegetation signal Stage 3 relies on.
- Edge preservation: Pearson correlation of the Sobel gradient magnitude of the NIR band of
  opt_v1 and opt_v2 (target > 0.90): refinement must not blur or invent field boundaries.
- Against a truth (`compare`: RMSE, PSNR, and both of the above), for stage2.evaluate and the
  training validation.

Three forms of the same numbers (docs/confidence.md: per-pixel work where it is cheapest), equal within 1e-5:
- `reference_tile_quality` (`reference_ndvi_rmse`, `reference_edge_preservation`): the definition,
  whole-tile arrays, float64 sums; the tests and benchmarks/bench_datapath.py measure the others
  against it.
- `tile_quality`, `ndvi_rmse`, `edge_preservation`, `RowQuality`: the CPU form the writer uses,
  NumPy in 256 px blocks (see BLOCK_SIDE), a few flat passes per block.
- `batch_quality_torch`, `batch_change_torch`, `batch_band_stats_torch`: batched on the model's
  device, so on a GPU the host only reads and writes (torch is imported inside them only).

The CPU form is NumPy only, so the writer threads and the report can use it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

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
# Tiles are measured in squares of BLOCK_SIDE px (a 256 px tile is one), which stay in the CPU's
# cache and bound every temporary. tile_quality of a 256 px tile took 0.87 ms as one block, 1.31 ms
# in 128 px blocks and 2.85 ms in 64 px ones (more calls, each too short); a 2048 px tile 0.063 s
# (the reference, with whole-tile temporaries: 0.17 s). Thread CPU time on 2 loaded cores.
BLOCK_SIDE = 256


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


def sobel_magnitude(band: np.ndarray) -> np.ndarray:
    """Gradient magnitude hypot(sobel axis 0, sobel axis 1) of one (H, W) band: the reference Sobel.

    scipy.ndimage.sobel's kernels ([1, 2, 1] smoothing, [-1, 0, 1] difference) and border (its
    'reflect', numpy's 'symmetric'), written as array slices: the same values within float32
    rounding (7e-7). `_sobel_fast` is the CPU form's (the same gradients, bit for bit; sqrt for hypot).
    """
    p = np.pad(_float(band), 1, mode="symmetric")
    # (a + 2b) + c in that order, into buffers: the same values as the plain expression
    across = np.add(p[:-2], np.multiply(p[1:-1], 2))       # smoothed along axis 0
    np.add(across, p[2:], out=across)
    down = np.add(p[:, :-2], np.multiply(p[:, 1:-1], 2))   # smoothed along axis 1
    np.add(down, p[:, 2:], out=down)
    gx = np.subtract(across[:, 2:], across[:, :-2])
    return np.hypot(gx, np.subtract(down[2:], down[:-2]), out=gx)


def _pearson(n: int, caa: float, cbb: float, cab: float) -> float | None:
    """Pearson's r from centred sums of n pairs; None where either side is flat (std < FLAT_STD).

    None, not NaN: r is 0/0 there, and NaN must never reach a JSON file (a NaN input still gives NaN).
    """
    if min(caa, cbb) < n * FLAT_STD**2:
        return None
    return float(np.clip(cab / math.sqrt(caa * cbb), -1.0, 1.0))


# ----------------------------------------------------------------------------- the reference
def reference_ndvi_rmse(v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None) -> float:
    """The definition: sqrt(mean((ndvi(v1) - ndvi(v2))^2)) over the `valid` pixels (all by default)."""
    d = ndvi(v1) - ndvi(v2)
    if valid is not None:
        d = d[valid]
    return math.sqrt(float(np.sum(d * d, dtype=np.float64)) / d.size)


def reference_edge_preservation(v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None
                                ) -> float | None:
    """The definition: Pearson r of the whole tiles' NIR `sobel_magnitude` over the `valid` pixels."""
    a, b = (sobel_magnitude(np.asarray(v)[NIR]) for v in (v1, v2))
    if valid is not None:
        a, b = a[valid], b[valid]
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    n = a.size
    a, b = a - float(a.sum()) / n, b - float(b.sum()) / n
    return _pearson(n, float(np.einsum("i,i->", a, a)), float(np.einsum("i,i->", b, b)),
                    float(np.einsum("i,i->", a, b)))


def reference_tile_quality(v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None
                           ) -> dict[str, float | None]:
    """`tile_quality` by the definition (whole-tile temporaries: slow, for tests and benchmarks)."""
    return {"ndvi_rmse": reference_ndvi_rmse(v1, v2, valid),
            "edge_preservation": reference_edge_preservation(v1, v2, valid)}


# ----------------------------------------------------------------------------- the CPU form
# Measured on real 256 px tiles, thread CPU time on 2 loaded cores (benchmarks/bench_datapath.py
# prints these figures for its own run): tile_quality 1.75 ms in the reference form, 0.85 ms here
# (in the pipeline, 2.0 -> 1.05 ms). What made the reference slow: np.hypot (0.32 ms per band;
# sqrt(gx*gx + gy*gy) takes 0.03 ms and differs by at most 1 float32 ulp), np.pad and column-shifted
# 2-D slices (0.015-0.025 ms per operation against 0.007 ms for a flat one), and fresh whole-array
# temporaries. Here every full-size pass is flat and contiguous, into buffers, and the borders are
# written again by row and column. The Pearson sums stay float64 (about 0.2 ms per block): float32
# partial sums would save about 0.1 ms but move r by up to 2e-8, and RowQuality, which takes other
# blocks, would no longer equal tile_quality within 1e-12. float64 einsum, not np.dot: OpenBLAS
# starts its own threads for a dot this long, which spin on cores the model or the other writer
# threads need.

def tile_quality(v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float | None]:
    """The per-tile `quality` object of the output JSON (plain floats or None: JSON-safe).

    `valid` (H, W) bool limits both metrics to those pixels (nan_policy=mask: the others are no data).
    """
    sums = _tile_sums(v1, v2, valid, ndvi=True, edges=True)
    return {"ndvi_rmse": sums.ndvi_rmse(), "edge_preservation": sums.edge_preservation()}


def ndvi_rmse(v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Root-mean-square difference of the two tiles' NDVI over the `valid` pixels (all by default)."""
    return _tile_sums(v1, v2, valid, ndvi=True, edges=False).ndvi_rmse()


def edge_preservation(v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None) -> float | None:
    """Pearson r of the NIR Sobel magnitudes of the two tiles, over the `valid` pixels (all by default).

    None where either magnitude is flat (std < FLAT_STD). A large tile is taken in blocks, each
    block's Sobel computed with one pixel of its neighbours around it, so the values are the whole tile's.
    """
    return _tile_sums(v1, v2, valid, ndvi=False, edges=True).edge_preservation()


def _tile_sums(v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None, *, ndvi: bool, edges: bool) -> _Sums:
    v1, v2 = np.asarray(v1), np.asarray(v2)
    sums = _Sums()
    h, w = v1.shape[-2:]
    for r0, r1, c0, c1 in _blocks(0, h, w):
        ok = None if valid is None else valid[r0:r1, c0:c1]
        if ndvi:
            sums.add_ndvi(v1[:, r0:r1, c0:c1], v2[:, r0:r1, c0:c1], ok)
        if edges:
            sums.add_edges(_sobel_block(v1[NIR], r0, r1, c0, c1), _sobel_block(v2[NIR], r0, r1, c0, c1), ok)
    return sums


def _blocks(r_start: int, r_stop: int, w: int) -> Iterator[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) of the BLOCK_SIDE px squares covering rows r_start:r_stop of a W px wide array."""
    for r in range(r_start, r_stop, BLOCK_SIDE):
        for c in range(0, w, BLOCK_SIDE):
            yield r, min(r + BLOCK_SIDE, r_stop), c, min(c + BLOCK_SIDE, w)


class _Sums:
    """What a tile's metrics are made of, added block by block or strip by strip (float64).

    Pearson's r comes from sums of values shifted by the first block's means, so one pass suffices:
    it equals the centred two-pass formula within float64 rounding (1e-12).
    """

    def __init__(self) -> None:
        self.n_ndvi, self.ndvi_sq = 0, 0.0
        self.n, self.shift = 0, (0.0, 0.0)
        self.edge_sums = [0.0] * 5        # a, b, a*a, b*b, a*b of the shifted magnitudes

    def add_ndvi(self, v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None) -> None:
        """One block of both (4, h, w) tiles; `valid` (h, w) bool or None."""
        d = _ndvi_difference(v1, v2)
        n = d.size if valid is None else int(np.count_nonzero(valid))
        if valid is not None:
            np.multiply(d, valid, out=d)       # 0.02 ms where d[valid] takes 0.12 (256 px)
        np.multiply(d, d, out=d)
        total = float(np.add.reduce(d, axis=None, dtype=np.float64))
        if valid is not None and not math.isfinite(total):
            # NaN or inf under the mask (0 * NaN is NaN): measure exactly the valid pixels, as the reference
            d = _ndvi_difference(v1, v2)[valid]
            total = float(np.sum(d * d, dtype=np.float64))
        self.n_ndvi += n
        self.ndvi_sq += total

    def add_edges(self, a: np.ndarray, b: np.ndarray, valid: np.ndarray | None) -> None:
        """Sobel magnitudes of one block of both tiles, (h, w) each; `valid` (h, w) bool or None."""
        n = a.size if valid is None else int(np.count_nonzero(valid))
        if n == 0:
            return
        a64, b64 = np.empty(a.shape), np.empty(b.shape)
        np.copyto(a64, a)
        np.copyto(b64, b)
        if valid is not None:
            np.multiply(a64, valid, out=a64)
            np.multiply(b64, valid, out=b64)
        sa, sb = float(a64.sum()), float(b64.sum())
        if self.n == 0:
            self.shift = (sa / n, sb / n)
        ma, mb = self.shift
        a64 -= ma
        b64 -= mb
        if valid is not None:
            np.multiply(a64, valid, out=a64)
            np.multiply(b64, valid, out=b64)
        af, bf = a64.ravel(), b64.ravel()
        part = [sa - n * ma, sb - n * mb, float(np.einsum("i,i->", af, af)), float(np.einsum("i,i->", bf, bf)),
                float(np.einsum("i,i->", af, bf))]
        if valid is not None and not all(map(math.isfinite, part)):
            part = self._exact_part(a[valid], b[valid])   # NaN or inf under the mask (0 * NaN is NaN)
        self.n += n
        self.edge_sums = [s + p for s, p in zip(self.edge_sums, part, strict=True)]

    def _exact_part(self, a: np.ndarray, b: np.ndarray) -> list[float]:
        """The sums over the valid pixels' magnitudes a, b alone, as the reference takes them."""
        a, b = a.astype(np.float64), b.astype(np.float64)
        if self.n == 0:
            self.shift = (float(a.sum()) / a.size, float(b.sum()) / b.size)
        a, b = a - self.shift[0], b - self.shift[1]
        return [float(a.sum()), float(b.sum()), float(np.einsum("i,i->", a, a)), float(np.einsum("i,i->", b, b)),
                float(np.einsum("i,i->", a, b))]

    def ndvi_rmse(self) -> float:
        return math.sqrt(self.ndvi_sq / self.n_ndvi)

    def edge_preservation(self) -> float | None:
        n = self.n
        sa, sb, saa, sbb, sab = self.edge_sums
        return _pearson(n, saa - sa * sa / n, sbb - sb * sb / n, sab - sa * sb / n)


def _ndvi_difference(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """ndvi(v1) - ndvi(v2) of (4, h, w) blocks, in two buffers: the same values as the plain expression."""
    v1, v2 = _float(v1), _float(v2)
    dtype = np.result_type(v1.dtype, v2.dtype)
    d, den = np.empty(v1.shape[1:], dtype), np.empty(v1.shape[1:], dtype)
    _ndvi_into(v1, d, den)
    other = np.empty(v1.shape[1:], dtype)
    _ndvi_into(v2, other, den)
    return np.subtract(d, other, out=d)


def _ndvi_into(v: np.ndarray, out: np.ndarray, den: np.ndarray) -> None:
    nir, red = v[NIR], v[RED]
    np.subtract(nir, red, out=out)
    np.add(nir, red, out=den)
    np.add(den, EPS, out=den)
    np.divide(out, den, out=out)


def _sobel_block(x: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Sobel magnitude of rows r0:r1, columns c0:c1 of the band x, with x's pixels around them as
    context and x's own borders reflected: the values of the whole band's Sobel there."""
    h, w = x.shape
    s0, s1, t0, t1 = max(r0 - 1, 0), min(r1 + 1, h), max(c0 - 1, 0), min(c1 + 1, w)
    return _sobel_fast(x[s0:s1, t0:t1])[r0 - s0:r1 - s0, c0 - t0:c1 - t0]


def _sobel_fast(band: np.ndarray) -> np.ndarray:
    """sobel_magnitude in flat passes: the same gradients bit for bit, sqrt(gx^2 + gy^2) for hypot.

    Shifting a flat (row-major) array by one element shifts it by a column, except at the first and
    last column, which are then written again (reflected) from their own columns.
    """
    x = np.ascontiguousarray(_float(band))
    h, w = x.shape
    if h < 2 or w < 2:
        return sobel_magnitude(x)
    n = h * w
    xf = x.ravel()
    s, gx, gy = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    sf, gxf, gyf = s.ravel(), gx.ravel(), gy.ravel()
    # smoothed along axis 0: (up + 2 centre) + down, the top and bottom rows reflected
    _smooth(xf[:n - 2 * w], xf[w:n - w], xf[2 * w:], sf[w:n - w])
    _smooth(x[0], x[0], x[1], s[0])
    _smooth(x[-2], x[-1], x[-1], s[-1])
    np.subtract(sf[2:], sf[:-2], out=gxf[1:-1])             # difference along axis 1
    np.subtract(s[:, 1], s[:, 0], out=gx[:, 0])
    np.subtract(s[:, -1], s[:, -2], out=gx[:, -1])
    # smoothed along axis 1: (left + 2 centre) + right, the first and last columns reflected
    _smooth(xf[:-2], xf[1:-1], xf[2:], sf[1:-1])
    _smooth(x[:, 0], x[:, 0], x[:, 1], s[:, 0])
    _smooth(x[:, -2], x[:, -1], x[:, -1], s[:, -1])
    np.subtract(sf[2 * w:], sf[:n - 2 * w], out=gyf[w:n - w])   # difference along axis 0
    np.subtract(s[1], s[0], out=gy[0])
    np.subtract(s[-1], s[-2], out=gy[-1])
    np.multiply(gx, gx, out=gx)
    np.multiply(gy, gy, out=gy)
    np.add(gx, gy, out=gx)
    return np.sqrt(gx, out=gx)


def _smooth(before: np.ndarray, centre: np.ndarray, after: np.ndarray, out: np.ndarray) -> None:
    """out = (before + 2 centre) + after, in the reference's order of operations."""
    np.multiply(centre, 2, out=out)
    np.add(before, out, out=out)
    np.add(out, after, out=out)


class RowQuality:
    """tile_quality of a tile given top to bottom, one final strip of rows at a time.

    For a windowed tile whose output replaces its input strip by strip (stage2.predict.windows):
    each strip is measured as it becomes final, with the last two rows of the strip before kept as
    the Sobel's context (its own last row is measured with the next strip, whose first row it needs).
    It equals tile_quality within float rounding (1e-12).
    """

    def __init__(self) -> None:
        self._sums = _Sums()
        self._prev: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None   # last 2 NIR rows, valid

    def add(self, v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None) -> None:
        """The next strip of rows, (4, r, W) each, final; `valid` (r, W) as in tile_quality."""
        v1, v2 = np.asarray(v1), np.asarray(v2)
        for r0, r1, c0, c1 in _blocks(0, v1.shape[1], v1.shape[2]):
            ok = None if valid is None else valid[r0:r1, c0:c1]
            self._sums.add_ndvi(v1[:, r0:r1, c0:c1], v2[:, r0:r1, c0:c1], ok)
        nir = [v[NIR] for v in (v1, v2)]
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
        return {"ndvi_rmse": self._sums.ndvi_rmse(), "edge_preservation": self._sums.edge_preservation()}

    def _measure(self, stack: list[np.ndarray], valid: np.ndarray | None, r0: int, r1: int) -> None:
        """Add the Sobel magnitudes of rows r0:r1 of the stacked NIR rows (their neighbours are in it)."""
        for q0, q1, c0, c1 in _blocks(r0, r1, stack[0].shape[1]):
            a, b = (_sobel_block(x, q0, q1, c0, c1) for x in stack)
            self._sums.add_edges(a, b, None if valid is None else valid[q0:q1, c0:c1])


# ----------------------------------------------------------------------------- the device form
# Batched on the tensors' device (the model's): on a GPU the host then only reads the results, one
# small copy per batch. float32 per pixel as the reference, float64 sums. torch is imported here only.
# Not for CPU tensors in the pipeline: there the NumPy forms are faster (on one thread, per 256 px
# tile of a batch of 16: quality 2.5 ms against 0.85, change 2.3 ms, band statistics 5.3 ms).

def batch_quality_torch(v1: torch.Tensor, v2: torch.Tensor, valid: torch.Tensor | None = None
                        ) -> list[dict[str, float | None]]:
    """`tile_quality` of each tile of a batch: v1, v2 (B, 4, H, W), `valid` (B, H, W) bool or None."""
    rows = _quality_sums_torch(v1, v2, valid).cpu().tolist()
    return [{"ndvi_rmse": math.sqrt(sq / n), "edge_preservation": _pearson(int(n), caa, cbb, cab)}
            for n, sq, caa, cbb, cab in rows]


def _quality_sums_torch(v1: torch.Tensor, v2: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, 5) float64 per tile: valid pixels, sum of squared NDVI differences, and the centred sums
    a*a, b*b, a*b of the NIR Sobel magnitudes over the valid pixels."""
    import torch

    v1, v2 = _float_torch(v1), _float_torch(v2)
    mask = torch.ones_like(v1[:, 0], dtype=torch.bool) if valid is None else valid.to(v1.device, torch.bool)
    n = mask.sum((1, 2), dtype=torch.float64)
    d = _ndvi_torch(v1) - _ndvi_torch(v2)
    ndvi_sq = torch.where(mask, d * d, 0).sum((1, 2), dtype=torch.float64)
    # where, not a product with the mask: a NaN on a pixel outside it must not count (0 * NaN is NaN)
    a, b = (torch.where(mask, _sobel_torch(v[:, NIR]).double(), 0) for v in (v1, v2))
    a = torch.where(mask, a - (a.sum((1, 2)) / n)[:, None, None], 0)
    b = torch.where(mask, b - (b.sum((1, 2)) / n)[:, None, None], 0)
    return torch.stack([n, ndvi_sq, (a * a).sum((1, 2)), (b * b).sum((1, 2)), (a * b).sum((1, 2))], dim=1)


def _float_torch(t: torch.Tensor) -> torch.Tensor:
    """float32 (half precision outputs too), float64 stays float64: as `_float`."""
    import torch

    return t if t.dtype == torch.float64 else t.float()


def _ndvi_torch(v: torch.Tensor) -> torch.Tensor:
    nir, red = v[:, NIR], v[:, RED]
    return (nir - red) / (nir + red + EPS)


def _sobel_torch(x: torch.Tensor) -> torch.Tensor:
    """`sobel_magnitude` of each (H, W) band of a (B, H, W) batch, by slices (a padding of one pixel
    'replicate' is numpy's 'symmetric'); sqrt(gx^2 + gy^2) as the CPU form."""
    import torch.nn.functional as F

    p = F.pad(x[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    across = (p[:, :-2] + 2 * p[:, 1:-1]) + p[:, 2:]
    down = (p[:, :, :-2] + 2 * p[:, :, 1:-1]) + p[:, :, 2:]
    gx = across[:, :, 2:] - across[:, :, :-2]
    gy = down[:, 2:] - down[:, :-2]
    return (gx * gx + gy * gy).sqrt()


def batch_change_torch(v1: torch.Tensor, v2: torch.Tensor, valid: torch.Tensor | None = None
                       ) -> list[float | None]:
    """Each tile's mean |opt_v2 - opt_v1| over its valid pixels and bands (None without one), as
    stage2.predict.confidence.ChangeSum: v1, v2 (B, C, H, W), `valid` (B, H, W) bool or None."""
    import torch

    v1, v2 = _float_torch(v1), _float_torch(v2)
    d = (v2 - v1).abs()
    if valid is None:
        count = torch.full((d.shape[0],), math.prod(d.shape[1:]), dtype=torch.float64, device=d.device)
    else:
        mask = valid.to(d.device, torch.bool)
        d = torch.where(mask[:, None], d, 0)
        count = mask.sum((1, 2), dtype=torch.float64) * d.shape[1]
    totals = torch.stack([d.sum((1, 2, 3), dtype=torch.float64), count], dim=1).cpu().tolist()
    return [total / c if c else None for total, c in totals]


def batch_band_stats_torch(arr: torch.Tensor, valid: torch.Tensor | None = None
                           ) -> list[dict[str, dict[str, float | int | None]]]:
    """stage2.product.band_stats of each tile of a (B, 4, H, W) batch: per band the count, mean,
    population std, min and max of its pixels that are neither NaN nor outside `valid` (B, H, W).

    With `valid` it equals band_stats of the tile with NaN put on the pixels outside it, as the
    writer does before writing.
    """
    import torch

    from .tiles import BANDS

    x = _float_torch(arr)
    ok = ~torch.isnan(x)
    if valid is not None:
        ok &= valid.to(x.device, torch.bool)[:, None]
    count = ok.sum((2, 3), dtype=torch.float64)
    x64 = torch.where(ok, x, 0).double()
    total, squares = x64.sum((2, 3)), (x64 * x64).sum((2, 3))
    lo = torch.where(ok, x, math.inf).amin((2, 3)).double()
    hi = torch.where(ok, x, -math.inf).amax((2, 3)).double()
    rows = torch.stack([count, total, squares, lo, hi], dim=2).cpu().tolist()
    return [{band: _band_stat(*values) for band, values in zip(BANDS, tile, strict=True)} for tile in rows]


def _band_stat(count: float, total: float, squares: float, lo: float, hi: float) -> dict[str, float | int | None]:
    """One band's entry of band_stats from its sums (the same formula, in Python floats)."""
    n = int(count)
    if n == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = total / n
    return {"count": n, "mean": mean, "std": math.sqrt(max(squares / n - mean * mean, 0.0)), "min": lo, "max": hi}


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
