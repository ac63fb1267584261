"""Confidence of one tile: the `tta` modes, and the output JSON's `confidence` object (docs/confidence.md).

- `tta` (conf/predict.yaml): how many passes the model makes over a tile (stage2.predict.module maps
  them back and gives their mean and per-pixel std); with a std the output has a second layer.
- `confidence`: per band the mean and 95th percentile of the std over the valid pixels, and the tile's
  mean absolute change |opt_v2 - opt_v1| over its valid pixels and bands (with every `tta`).

numpy only: the run's plan and its rerun trust read the modes without importing torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..product import OUTPUT_KEY, STD_KEY
from ..tiles import BANDS

# Passes per mode: `flips` the tile and its horizontal, vertical and double flip; `d4` adds the
# transposed tile's four (the 90-degree rotations and the two diagonal mirrors).
TTA_PASSES = {"none": 1, "flips": 4, "d4": 8}
TTA_MODES = tuple(TTA_PASSES)
STD_PERCENTILE = 95


def layers_for(tta: str) -> tuple[str, ...]:
    """The layers an output made with `tta` has: opt_v2, and its std where there is more than one pass."""
    return (OUTPUT_KEY,) if tta == "none" else (OUTPUT_KEY, STD_KEY)


class ChangeSum:
    """sum |opt_v2 - opt_v1| and its count over valid pixels and bands, added strip by strip (float64).

    Why a sum: a windowed tile's output replaces its input strip by strip (stage2.predict.windows),
    so the change is measured as each strip becomes final; a whole tile is one strip.
    """

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, v1: np.ndarray, v2: np.ndarray, valid: np.ndarray | None = None) -> None:
        """One strip of (4, r, W) rows of both; `valid` (r, W) bool, None for every pixel."""
        d = np.abs(v2 - v1)
        if valid is not None:
            d = d[:, valid]
        self.total += float(np.sum(d, dtype=np.float64))
        self.count += d.size

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


def std_stats(std: np.ndarray, valid: np.ndarray | None = None) -> dict[str, dict[str, float | None]]:
    """Per band of a (4, H, W) std: the mean and the 95th percentile (numpy's linear one) of the valid pixels."""
    out = {}
    for band, values in zip(BANDS, std, strict=True):
        values = values[valid] if valid is not None else values.ravel()
        if values.size == 0:
            out[band] = {"std_mean": None, "std_p95": None}
            continue
        out[band] = {"std_mean": float(np.add.reduce(values, dtype=np.float64)) / values.size,
                     "std_p95": float(np.percentile(values, STD_PERCENTILE))}
    return out


def confidence(change: ChangeSum, std: np.ndarray | None, valid: np.ndarray | None) -> dict[str, Any]:
    """The output JSON's `confidence`: each band's std statistics (where there is a std), then the change."""
    out: dict[str, Any] = {} if std is None else std_stats(std, valid)
    out["mean_abs_change"] = change.mean
    return out
