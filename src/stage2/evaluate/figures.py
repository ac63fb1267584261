"""The evaluation's PNGs: per tile, truth | opt_v1 | opt_v2 and how far each is from the truth.

The RGB panels use the report's display (stage2.figures), with the gain taken from the truth so that
all three panels are stretched alike. matplotlib's object API, imported where a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..figures import display_gain, rgb
from .score import Evaluation, tile_arrays


def comparison_figure(path: Path, name: str, truth: np.ndarray, v1: np.ndarray, v2: np.ndarray,
                      before: dict[str, float | None], after: dict[str, float | None]) -> Path:
    """truth | opt_v1 | opt_v2 RGB (the report's display) and |v1 - truth|, |v2 - truth| on one scale."""
    from matplotlib.figure import Figure

    gain = display_gain(truth)
    err1 = np.abs(v1 - truth).mean(axis=0)
    err2 = np.abs(v2 - truth).mean(axis=0)
    vmax = max(float(np.percentile(err1, 99)), 1e-3)
    fig = Figure(figsize=(19, 4.4), dpi=90, layout="constrained")
    axes = fig.subplots(1, 5, gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.22]})
    panels = [(rgb(truth, gain), "truth"),
              (rgb(v1, gain), f"opt_v1 (Stage 1)\nRMSE {before['rmse']:.4f}  NDVI RMSE {before['ndvi_rmse']:.3f}"),
              (rgb(v2, gain), f"opt_v2 (Stage 2)\nRMSE {after['rmse']:.4f}  NDVI RMSE {after['ndvi_rmse']:.3f}")]
    for ax, (img, title) in zip(axes, panels, strict=False):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=10)
    axes[3].imshow(err1, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
    axes[3].set_title("|opt_v1 - truth| (band mean)", fontsize=10)
    im = axes[4].imshow(err2, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
    axes[4].set_title("|opt_v2 - truth| (same scale)", fontsize=10)
    fig.colorbar(im, ax=axes[4], shrink=0.9, pad=0.02).set_label("reflectance error", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{name}   (RGB = B04, B03, B02 x{gain:.0f})", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_figures(ev: Evaluation, folder: str | Path) -> list[Path]:
    """One comparison PNG per evaluated tile in `folder`, read again from `ev`'s (local) folders."""
    folder = Path(folder)
    out = []
    for t in ev.tiles:
        truth, v1, v2 = tile_arrays(ev, t.name)
        out.append(comparison_figure(folder / f"{t.name}.png", t.name, truth, v1, v2, t.before, t.after))
    return out
