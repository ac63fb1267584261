"""The report's figures: one comparison PNG per tile and the quality histograms
(docs/usage.md#quality, docs/confidence.md).

Uses matplotlib's object API (`matplotlib.figure.Figure`, Agg canvas) rather than pyplot, so no
global backend is switched, nothing needs a display, and figures are freed as soon as they are
saved. matplotlib is imported inside the functions that draw: `import stage2` stays light. The RGB
display itself (`rgb`, `display_gain`) is stage2.figures, shared with the evaluation's PNGs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..figures import RGB_GAIN, display_gain, rgb
from ..quality import EDGE_PRESERVATION_TARGET, NDVI_RMSE_TARGET, ndvi

DPI = 100
BAD = "#b00020"         # problem red, shared with the HTML page
CHANGED = "#9a5b00"     # a tile that changed more than the guide's preservation targets: amber, not an error
# The change and std maps' fixed colour scales (reflectance): the same colours mean the same values
# on every tile and in every run. Chosen on the demo run (make demo's refiner, tta=d4): per tile a
# mean change of 0.006-0.015 with features up to about 0.025, and a std of about 0.002 whose 95th
# percentile stays below 0.004 in every band. Larger values show as the top colour (the bar's arrow).
CHANGE_VMAX = 0.03
STD_VMAX = 0.005
CHANGE_CMAP = "magma"
STD_CMAP = "viridis"
# Largest side of the arrays handed to matplotlib. A panel is about 420 px wide at DPI, so larger tiles
# are block-averaged first: imshow of a 10,000 px tile would resample 10^8 pixels through float RGBA
# copies (3 GB) for a picture of the same size.
DISPLAY_MAX_SIDE = 1024


def thumbnail(opt: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> tuple[np.ndarray, int]:
    """A (C, H, W) tile as block means of f x f pixels, at most `max_side` px a side, and f.

    NaN (no data) is left out of each mean; a block of no data stays NaN. Rows and columns past
    the last whole block are dropped (fewer than f px).
    """
    h, w = opt.shape[1:]
    f = math.ceil(max(h, w) / max_side)
    if f == 1:
        return opt, 1
    hh, ww = h // f * f, w // f * f
    out = np.empty((opt.shape[0], hh // f, ww // f), dtype=np.float32)
    for c, band in enumerate(opt):
        blocks = band[:hh, :ww].reshape(hh // f, f, ww // f, f)
        valid = np.count_nonzero(~np.isnan(blocks), axis=(1, 3))
        total = np.nansum(blocks, axis=(1, 3), dtype=np.float64)
        out[c] = np.where(valid > 0, total / np.maximum(valid, 1), np.nan)
    return out, f


def _metric_text(rmse: float | None, edge: float | None) -> str:
    r = "n/a" if rmse is None else f"{rmse:.4f}"
    e = "n/a (flat)" if edge is None else f"{edge:.3f}"
    return (f"NDVI RMSE {r} (target < {NDVI_RMSE_TARGET:.2f})   "
            f"edge preservation {e} (target > {EDGE_PRESERVATION_TARGET:.2f})")


def tile_figure(path: Path, name: str, v1: np.ndarray, v2: np.ndarray, month: object, biome: object,
                rmse: float | None, edge: float | None, below: bool, std: np.ndarray | None = None) -> Path:
    """Write `opt_v1 RGB | opt_v2 RGB | NDVI(opt_v2) - NDVI(opt_v1) | change [| std]` for one tile to `path`.

    The change is |opt_v2 - opt_v1| and the std opt_v2_std (runs with TTA), each the mean over the
    four bands, on fixed colour scales (CHANGE_VMAX, STD_VMAX) so that tiles and runs compare at a
    glance. A tile larger than DISPLAY_MAX_SIDE is drawn from block means (the title says by how
    much); no-data (NaN) pixels are transparent.
    """
    from matplotlib.figure import Figure

    from .check import change_map

    h, w = v1.shape[1:]
    change, _ = thumbnail(change_map(v1, v2)[None])
    spread = None if std is None else thumbnail(np.mean(std, axis=0, dtype=np.float32)[None])[0][0]
    (v1, f), (v2, _) = thumbnail(v1), thumbnail(v2)
    diff = (ndvi(v2) - ndvi(v1)).astype(np.float32)
    # Symmetric scale: at least the NDVI target, so a tile within target looks pale, and wide
    # enough for its largest changes (99.5th percentile, so one hot pixel does not wash it out).
    lim = max(NDVI_RMSE_TARGET, float(np.nan_to_num(np.nanpercentile(np.abs(diff), 99.5))))

    n_maps = 2 if spread is None else 3                  # panels with a colour bar
    panel_w = 3.4 * min(max(w / h, 0.5), 1.6)            # keep very long tiles readable
    fig = Figure(figsize=((2 + n_maps) * panel_w + 1.1 * n_maps, 4.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2 + n_maps, gridspec_kw={"width_ratios": [1, 1] + [1.2] * n_maps})
    gain = display_gain(v1)      # from opt_v1 alone, for both panels: they stay comparable
    axes[0].imshow(rgb(v1, gain), interpolation="nearest")
    shown = f", shown as {f}x{f} px means" if f > 1 else ""
    axes[0].set_title(f"opt_v1 (Stage 1)  {h}x{w} px{shown}", fontsize=10)
    axes[1].imshow(rgb(v2, gain), interpolation="nearest")
    axes[1].set_title("opt_v2 (Stage 2)", fontsize=10)
    im = axes[2].imshow(diff, cmap="BrBG", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[2].set_title("NDVI difference", fontsize=10)
    cbar = fig.colorbar(im, ax=axes[2], shrink=0.9, pad=0.02)
    cbar.set_label("NDVI(opt_v2) - NDVI(opt_v1)\n(green: more vegetation signal)", fontsize=8)
    _fixed_map(fig, axes[3], change[0], CHANGE_VMAX, CHANGE_CMAP, "change |opt_v2 - opt_v1| (band mean)",
               "reflectance change")
    if spread is not None:
        _fixed_map(fig, axes[4], spread, STD_VMAX, STD_CMAP, "std across TTA passes (band mean)", "opt_v2_std")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    stretch = ("x2 brightness" if gain == RGB_GAIN else
               f"x{gain:.0f} brightness (too dark for x2)")
    for ax in axes[:2]:      # two lines: a narrow panel's label must not run into its neighbour's
        ax.set_xlabel(f"RGB = B04, B03, B02\n{stretch}", fontsize=9, color="black" if gain == RGB_GAIN else BAD)
    status = "   changed more than the preservation targets" if below else ""
    fig.suptitle(f"{name}\nmonth {month}   biome {biome}   {_metric_text(rmse, edge)}{status}",
                 fontsize=11, color=CHANGED if below else "black")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _fixed_map(fig, ax, values: np.ndarray, vmax: float, cmap: str, title: str, label: str) -> None:
    """One band-mean map on the fixed scale [0, vmax]; the colour bar's arrow marks values above it."""
    im = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    ax.set_xlabel(f"mean {mean:.4f}", fontsize=9)
    cbar = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02, extend="max")
    cbar.set_label(f"{label} (fixed scale 0-{vmax:g})", fontsize=8)


def summary_figure(path: Path, rmse: list[float], edge: list[float], n_tiles: int, n_flat: int) -> Path:
    """Histograms of both metrics over the run's tiles, with the target lines: how much Stage 2 changed
    the tiles against opt_v1, which says nothing of their error (that needs a truth: stage2.evaluate)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.4), dpi=DPI, layout="constrained")
    ax_r, ax_e = fig.subplots(1, 2)
    _histogram(ax_r, rmse, NDVI_RMSE_TARGET, f"target < {NDVI_RMSE_TARGET:.2f}",
               lo=0.0, hi=max([NDVI_RMSE_TARGET * 1.5, *rmse]))
    ax_r.set_xlabel("NDVI RMSE of opt_v2 against opt_v1 (lower: NDVI changed less)")
    ax_r.set_title(f"NDVI RMSE: {sum(v >= NDVI_RMSE_TARGET for v in rmse)} of {len(rmse)} tiles "
                   "changed more than the target", fontsize=11)
    _histogram(ax_e, edge, EDGE_PRESERVATION_TARGET, f"target > {EDGE_PRESERVATION_TARGET:.2f}",
               lo=min([EDGE_PRESERVATION_TARGET - 0.1, *edge]), hi=1.0)
    ax_e.set_xlabel("edge preservation of opt_v2 against opt_v1 (higher: edges kept)\n"
                    "Pearson r of the NIR Sobel magnitudes")
    flat = f", {n_flat} flat (undefined)" if n_flat else ""
    ax_e.set_title(f"Edge preservation: {sum(v <= EDGE_PRESERVATION_TARGET for v in edge)} of {len(edge)} "
                   f"tiles changed more than the target{flat}", fontsize=11)
    fig.suptitle(f"How much Stage 2 changed {n_tiles} tiles (against opt_v1: change, not error; error needs a "
                 "truth: python -m stage2.evaluate)", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _histogram(ax, values: list[float], target: float, label: str, lo: float, hi: float) -> None:
    from matplotlib.ticker import MaxNLocator

    if hi <= lo:
        hi = lo + 1e-3
    if values:
        ax.hist(values, bins=min(40, max(10, len(values) // 3)), range=(lo, hi), color="#4a7fb0",
                edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.axvline(target, color=BAD, linestyle="--", linewidth=1.5, label=label)
    ax.set_xlim(lo, hi)
    ax.set_ylabel("tiles")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper center")
