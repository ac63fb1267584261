"""Validation figures that show the spread, not only the mean.

A mean of per-tile RMSEs can hide everything that matters: one dark water tile whose error drops
from 0.022 to 0.006 makes "-12 %" of five tiles that barely moved, while the pooled RMSE (all
pixels of all tiles) stays where it was. So training reports, beside the means:

- `val_rmse_pooled_in` / `_out`: RMSE over every pixel of every degraded held-out tile;
- `val_ratio_median` / `val_ratio_worst`: RMSE(output) / RMSE(input) per tile, median and largest;
- `val_tiles_worse`: tiles whose ratio is above `WORSE` (worse by more than 2 %);
- `val_clean_change_mean` / `_worst`: RMSE between output and input of the *clean* held-out tiles
  (the truth as the input): how far the refiner moves a tile that needs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

WORSE = 1.02     # a tile counts as made worse above this ratio


def tile_errors(truth: np.ndarray, inp: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Sums of squared errors of input and output against the truth, their RMSEs and the pixel count."""
    t = np.asarray(truth, dtype=np.float64)
    sse_in = float(((np.asarray(inp, dtype=np.float64) - t) ** 2).sum())
    sse_out = float(((np.asarray(out, dtype=np.float64) - t) ** 2).sum())
    n = int(t.size)
    return {"sse_in": sse_in, "sse_out": sse_out, "n": n,
            "rmse_in": (sse_in / n) ** 0.5, "rmse_out": (sse_out / n) ** 0.5}


def validation_scores(tiles: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The spread figures of the module docstring from tile_errors() records (with `clean`: bool)."""
    scores: dict[str, float] = {}
    degraded = [t for t in tiles if not t["clean"]]
    if degraded:
        n = sum(t["n"] for t in degraded)
        scores["val_rmse_pooled_in"] = (sum(t["sse_in"] for t in degraded) / n) ** 0.5
        scores["val_rmse_pooled_out"] = (sum(t["sse_out"] for t in degraded) / n) ** 0.5
        ratios = np.array([t["rmse_out"] / t["rmse_in"] for t in degraded if t["rmse_in"] > 0])
        if ratios.size:
            scores.update(val_ratio_median=float(np.median(ratios)), val_ratio_worst=float(ratios.max()),
                          val_tiles_worse=float((ratios > WORSE).sum()))
    clean = [t["rmse_out"] for t in tiles if t["clean"]]      # the input is the truth: rmse_out is the change
    if clean:
        scores.update(val_clean_change_mean=float(np.mean(clean)), val_clean_change_worst=float(np.max(clean)))
    return scores
