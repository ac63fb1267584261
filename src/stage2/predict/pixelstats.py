"""Per-pixel statistics of a batch's whole tiles on the model's device (docs/confidence.md#where).

What the writer would otherwise compute on the host per tile, from the same float32 values:
the `quality` object, `confidence` (the TTA std's per band mean and 95th percentile, the mean
|opt_v2 - opt_v1|) and the product's `band_stats`. On a GPU the host then only reads a few
numbers per tile and writes the files; on a CPU the NumPy forms are faster (quality 0.85 against
2.5 ms per 256 px tile on one thread, stage2.quality), so `pixel_stats: auto` keeps them there.
Each value equals the host form within 1e-5 (tests/predict/test_pixelstats.py).

Windowed tiles are measured strip by strip as they are blended (stage2.predict.windows), on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..quality import batch_band_stats_torch, batch_change_torch, batch_quality_torch
from ..tiles import BANDS, Tile
from .confidence import percentile_rank

PIXEL_STATS = ("auto", "device", "host")


@dataclass
class TileStats:
    """One whole tile's statistics, as the writer puts them in its JSON."""

    quality: dict[str, float | None] | None     # None with quality=false
    mean_abs_change: float | None
    band_stats: dict[str, dict[str, Any]]        # of opt_v2 with no-data pixels left out
    std_stats: dict[str, dict[str, float | None]] | None   # None without a std (tta: none)


def on_device(setting: str, device: torch.device) -> bool:
    """Whether `pixel_stats` (auto | device | host) puts the work on `device`: auto means off the CPU."""
    if setting not in PIXEL_STATS:
        raise ValueError(f"pixel_stats must be one of {', '.join(PIXEL_STATS)}, got {setting!r}")
    return setting == "device" or (setting == "auto" and device.type != "cpu")


def valid_mask(tiles: list[Tile], device: torch.device) -> torch.Tensor:
    """(B, H, W) bool for tiles of one size: the pixels that hold data (not no-data)."""
    valid = torch.ones((len(tiles), *tiles[0].array.shape[1:]), dtype=torch.bool)
    for i, t in enumerate(tiles):
        if t.nodata is not None:
            valid[i] = torch.from_numpy(~t.nodata)
    return valid.to(device, non_blocking=device.type == "cuda")


def batch_stats(tiles: list[Tile], v1: torch.Tensor, v2: torch.Tensor, std: torch.Tensor | None, *,
                quality: bool) -> list[TileStats]:
    """TileStats of each tile of the padded batch: v1 the model's input, v2 its output, std the passes' std.

    Tiles of one size are measured together, cropped to that size: the Sobel of the quality metrics
    must see a tile's own border, not its padding.
    """
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tiles):
        by_size.setdefault(tuple(t.array.shape[1:]), []).append(i)
    out: list[TileStats | None] = [None] * len(tiles)
    for (h, w), idx in by_size.items():
        rows = torch.tensor(idx, device=v1.device) if len(idx) < len(tiles) else slice(None)
        a, b = v1[rows, :, :h, :w], v2[rows, :, :h, :w]
        valid = valid_mask([tiles[i] for i in idx], v1.device)
        q = batch_quality_torch(a, b, valid) if quality else [None] * len(idx)
        spread = [None] * len(idx) if std is None else std_stats_torch(std[rows, :, :h, :w], valid)
        found = zip(q, batch_change_torch(a, b, valid), batch_band_stats_torch(b, valid), spread, strict=True)
        for i, row in zip(idx, found, strict=True):
            out[i] = TileStats(*row)
    return out


def std_stats_torch(std: torch.Tensor, valid: torch.Tensor) -> list[dict[str, dict[str, float | None]]]:
    """stage2.predict.confidence.std_stats of each tile of a (B, 4, H, W) std over its valid pixels:
    the mean and the linear 95th percentile (as numpy.percentile), per band."""
    out = []
    for s, ok in zip(std.float(), valid, strict=True):
        flat = s[:, ok]                                        # (4, n) valid pixels
        if flat.shape[1] == 0:
            out.append({band: {"std_mean": None, "std_p95": None} for band in BANDS})
            continue
        lo, frac = percentile_rank(flat.shape[1])
        ranked = flat.sort(dim=1).values[:, lo:lo + 2].double()
        high = ranked[:, 1] if ranked.shape[1] > 1 else ranked[:, 0]
        p95 = ranked[:, 0] + frac * (high - ranked[:, 0])
        means = flat.sum(dim=1, dtype=torch.float64) / flat.shape[1]
        rows = torch.stack([means, p95], dim=1).cpu().tolist()
        out.append({band: {"std_mean": m, "std_p95": p} for band, (m, p) in zip(BANDS, rows, strict=True)})
    return out
