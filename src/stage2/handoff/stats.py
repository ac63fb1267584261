"""The folder's band statistics, exactly, from each output's own `band_stats`.

Each output JSON holds, per band, the count of valid pixels, their mean, population std, min and max
(stage2.product.band_stats). Their union is computed from those five numbers alone, without reading a
pixel: the count-weighted mean, and the pooled population variance
    var = sum_i n_i * (std_i^2 + (mean_i - mean)^2) / N,
which is the variance of all N pixels together (the law of total variance). Sums use math.fsum, so
the result does not depend on the order of the tiles.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..tiles import BANDS

Stats = dict[str, dict[str, Any]]


def empty_band() -> dict[str, Any]:
    return {"count": 0, "mean": None, "std": None, "min": None, "max": None}


def aggregate_band_stats(per_output: Iterable[Mapping[str, Mapping[str, Any]]]) -> Stats:
    """The statistics of every valid pixel of every output, per band, from the outputs' `band_stats`."""
    per_output = list(per_output)
    return {band: _pooled([s[band] for s in per_output if s.get(band) and s[band].get("count")])
            for band in BANDS}


def _pooled(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One band's statistics over the pixels of `parts` (each a band's count, mean, std, min, max)."""
    if not parts:
        return empty_band()
    counts = [int(p["count"]) for p in parts]
    means = [float(p["mean"]) for p in parts]
    total = sum(counts)
    mean = math.fsum(n * m for n, m in zip(counts, means, strict=True)) / total
    var = math.fsum(n * (float(p["std"]) ** 2 + (m - mean) ** 2)
                    for n, m, p in zip(counts, means, parts, strict=True)) / total
    return {"count": total, "mean": mean, "std": math.sqrt(max(var, 0.0)),
            "min": min(float(p["min"]) for p in parts), "max": max(float(p["max"]) for p in parts)}


def is_complete(stats: Any) -> bool:
    """Whether `stats` is a `band_stats` object naming every band (else it is derived from the raster)."""
    # dict, not Mapping: a parsed JSON is made of dicts, and the ABC check costs 10,000 outputs 0.1 s
    return isinstance(stats, dict) and all(isinstance(stats.get(b), dict) and "count" in stats[b] for b in BANDS)
