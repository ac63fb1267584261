"""Tiles of any size (SPEC 9): a large tile is cut into windows, and the windows are blended back.

A tile whose padded height or width exceeds `window.above` is refined as a grid of `window.size` px
windows that overlap by `window.overlap` px. To the sampler and the model each window is an ordinary
item (a tile of that size); only this module, the data module's hook and the writer know a tile
was cut:
- `Grid`: where the windows sit and how they are weighted;
- `WindowSource` (main process): reads a windowed tile once, when its first window is needed, and
  cuts windows from it lazily (a window is a view until the batch copies it into a tensor);
- `Assembly` (writer): sum(w * y) / sum(w) as the windows arrive, row of windows by row of windows,
  written over the tile's input rows as they become final. With test-time augmentation each window
  brings the mean of its passes and their std; the std maps are blended with the same weights into an
  array of their own (docs/confidence.md).

numpy only: the run's plan checks the settings here without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..quality import RowQuality
from ..tiles import MIN_SIDE, N_BANDS, Tile, TileFailure
from .confidence import ChangeSum

# Blend weights: a raised cosine (Hann) across each window, plus this floor. The floor keeps every
# pixel's weight sum at least FLOOR**2 (a tile corner covered by one window's corner), far from
# float32's rounding; the step it makes where a window begins is at most 2 x FLOOR x the difference
# of the two windows' outputs (1e-4 for outputs 0.05 apart, Sentinel-2's own quantisation).
WEIGHT_FLOOR = 1e-3
# Bytes per tile pixel a windowed tile holds while it is refined: its float32 array (4 bands: the input,
# becoming the output; see Assembly) and, under nan_policy=mask, the no-data mask (1 byte).
BYTES_PER_PIXEL = N_BANDS * 4 + 1


@dataclass(frozen=True)
class WindowSettings:
    """`window.size`, `window.overlap` and `window.above` of conf/predict.yaml, checked."""

    size: int
    overlap: int
    above: int

    def __post_init__(self) -> None:
        for key in ("size", "overlap", "above"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"window.{key}={value!r} is not a whole number of pixels")
        if self.size < MIN_SIDE:
            raise ValueError(f"window.size={self.size}: windows need at least {MIN_SIDE} px a side")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"window.overlap={self.overlap}: use 0 up to window.size - 1 ({self.size - 1})")
        if self.above < self.size:
            raise ValueError(f"window.above={self.above} is below window.size={self.size}: tiles up to "
                             "window.above run whole, larger ones are cut into smaller windows")

    @property
    def stride(self) -> int:
        return self.size - self.overlap


def positions(length: int, size: int, stride: int, multiple: int) -> tuple[int, ...]:
    """Window starts along one side: multiples of `multiple`, the fewest at most `stride` apart,
    spread evenly from 0 to flush with the side padded to a multiple of `multiple`.

    Covers every pixel and no window starts outside the tile; the last window ends where the
    model's own padding of the whole tile would end, so its few px past the edge are reflect-padded
    exactly as the tile's would be. `size` and `stride` are multiples of `multiple`.
    """
    padded = length + (-length) % multiple
    if padded <= size:
        return (0,)
    n = math.ceil((padded - size) / stride) + 1
    steps = (padded - size) // multiple
    return tuple(multiple * (i * steps // (n - 1)) for i in range(n))


def profile(n: int) -> np.ndarray:
    """Blend weight along one side of an n px window: raised cosine plus WEIGHT_FLOOR (float64)."""
    return WEIGHT_FLOOR + (1.0 - WEIGHT_FLOOR) * np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2


@dataclass(frozen=True)
class Grid:
    """The windows of one tile, row-major: window k sits at (ys[k // len(xs)], xs[k % len(xs)])."""

    height: int
    width: int
    win_h: int
    win_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    overlap: int

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def origin(self, k: int) -> tuple[int, int]:
        i, j = divmod(k, len(self.xs))
        return self.ys[i], self.xs[j]

    def cut(self, arr: np.ndarray, k: int) -> np.ndarray:
        """The part of window k inside a (C, H, W) array: a view, no copy. The last row and column of
        windows reach up to patch size - 1 px past the tile; the batch reflect-pads them back."""
        y, x = self.origin(k)
        return arr[:, y:y + self.win_h, x:x + self.win_w]

    def weights(self) -> np.ndarray:
        """(win_h, win_w) float32 weights of a whole window: the outer product of the two profiles
        (a window cut short by the tile's edge takes its top-left part)."""
        return np.outer(profile(self.win_h), profile(self.win_w)).astype(np.float32)

    def weight_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """sum(w) over all windows, as row and column factors: the grid holds every (y, x) pair of
        starts and the weights are separable, so the sum at (r, c) is rows[r] * cols[c]."""
        return _side_sum(self.height, self.ys, self.win_h), _side_sum(self.width, self.xs, self.win_w)

    def describe(self) -> dict[str, Any]:
        """`processing.windows` of the output JSON: `refined_pixels` counts whole windows (the model's input)."""
        return {"count": self.count, "grid": [len(self.ys), len(self.xs)], "size": [self.win_h, self.win_w],
                "overlap": self.overlap, "refined_pixels": self.count * self.win_h * self.win_w}


def _side_sum(length: int, starts: tuple[int, ...], size: int) -> np.ndarray:
    total = np.zeros(length, dtype=np.float64)
    p = profile(size)
    for s in starts:
        part = total[s:s + size]
        part += p[:part.size]
    return total


def grid_for(shape: tuple[int, ...], settings: WindowSettings, multiple: int) -> Grid | None:
    """The windows of a (4, H, W) tile, or None when it runs whole (padded sides <= window.above).

    Windows start on the model's patch grid (multiples of `multiple`, the patch size), so every
    window cuts the tile into the same patches as the whole tile would be: a pixel has the same
    place in its patch in every window, and the patch-scale texture of a ViT's output lines up
    where windows are blended. Measured on a 768 px mosaic of real tiles with prithvi_eo_tiny:
    windows on the patch grid change the output from the whole-tile run by 0.023 (mean abs), off
    the grid by 0.051, as much as the refinement itself (0.049). Hence `window.size` and the
    step between windows are taken down to multiples of the patch size (256 and 192 for 16 px).
    """
    h, w = shape[-2:]
    ph, pw = h + (-h) % multiple, w + (-w) % multiple     # as model.padded_size (no torch here)
    if max(ph, pw) <= settings.above:
        return None
    size = max(multiple, settings.size - settings.size % multiple)
    stride = max(multiple, settings.stride - settings.stride % multiple)
    win_h, win_w = min(size, ph), min(size, pw)
    return Grid(h, w, win_h, win_w, positions(h, win_h, stride, multiple), positions(w, win_w, stride, multiple),
                settings.overlap)


def whole_tile(shape: tuple[int, ...]) -> dict[str, Any]:
    """`processing.windows` of a tile that ran whole: one window, the tile itself."""
    h, w = shape[-2:]
    return {"count": 1, "grid": [1, 1], "size": [h, w], "overlap": 0, "refined_pixels": h * w}


# ---------------------------------------------------------------------------- main process: cutting
class WindowRef(NamedTuple):
    """What the DataLoader carries for a window: no pixels (they are cut in the main process)."""

    file: int          # index into the run's file list
    index: int         # window index in the tile's grid
    of: int            # the tile's window count (the progress bar advances 1/of per window)


@dataclass
class Window:
    """One window with its pixels, ready for a batch; `tile` is shared by all windows of the tile."""

    tile: Tile
    grid: Grid
    index: int

    @property
    def array(self) -> np.ndarray:
        return self.grid.cut(self.tile.array, self.index)

    @property
    def name(self) -> str:
        return f"{self.tile.name} (window {self.index + 1}/{self.grid.count})"


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class WindowSource:
    """Main process: each windowed tile is read once, at its first window, and released after its last.

    Why here and not in the DataLoader workers: a worker reads the items of the batches it is
    given, so a tile whose windows are spread over four workers would be read (and, compressed,
    decompressed) four times and held four times. Workers carry only WindowRefs; cutting a
    window from the tile in memory is a copy of its pixels (1 MiB at 256 px).
    """

    def __init__(self, files: list[Path], grids: dict[int, Grid], load: Callable[[Path], Tile | TileFailure],
                 name: Callable[[Path], str]) -> None:
        self.files = files
        self.grids = grids
        self.load = load
        self.name = name
        self._open: dict[int, list[Any]] = {}      # file index -> [Tile | TileFailure, windows not yet taken]

    def take(self, ref: WindowRef) -> Window | TileFailure | None:
        """The window, or the tile's failure at its first window (None for its other windows)."""
        entry = self._open.get(ref.file)
        first = entry is None
        if first:
            entry = self._open[ref.file] = [self._read(ref.file), self.grids[ref.file].count]
        entry[1] -= 1
        if entry[1] == 0:
            del self._open[ref.file]      # the writer keeps the tile until its output is written
        tile = entry[0]
        if isinstance(tile, TileFailure):
            return tile if first else None
        return Window(tile, self.grids[ref.file], ref.index)

    def _read(self, file: int) -> Tile | TileFailure:
        path, grid = self.files[file], self.grids[file]
        need, free = grid.height * grid.width * BYTES_PER_PIXEL, available_memory()
        if free is not None and need > free:
            return TileFailure(self.name(path), path,
                               f"tile {grid.height}x{grid.width} px needs about {need / 2**30:.1f} GiB for its array; "
                               f"{free / 2**30:.1f} GiB of memory is available",
                               "split the tile in Stage 1, or run it on a machine with more memory "
                               "(windows bound the model's memory, not the tile's own array)")
        tile = self.load(path)
        if isinstance(tile, Tile) and tile.array.shape[1:] != (grid.height, grid.width):
            return TileFailure(tile.name, path, f"array {tile.array.shape} does not match its header",
                               "the file changed while the run read it: rerun")
        return tile


# ---------------------------------------------------------------------------- writer: assembling
class Assembly:
    """One windowed tile's output, assembled in the tile's own array as its windows arrive.

    A tile's windows arrive in row-major order (one bucket, one rank, batches in order). The
    current window row is summed into a strip, sum(w * y); when the row is complete, the tile rows
    that no later window covers are final: divided by sum(w), clipped, measured for quality, given
    their no-data NaN, and written over the same input rows, which no window needs any more (later
    windows start at or below them, and a batch's windows are cut before its outputs are blended).
    So a windowed tile holds one tile-sized array (its input, turning into its output) and a strip
    of one window's height, never a list of windows. With a std (`std=True`) it holds a second
    tile-sized array and strip for it; the change |opt_v2 - opt_v1| is summed as each strip is final.
    """

    def __init__(self, tile: Tile, grid: Grid, quality: bool, std: bool = False) -> None:
        self.tile = tile
        self.grid = grid
        self.weights = grid.weights()
        self.row_sums, self.col_sums = grid.weight_sums()
        self.strip = np.zeros((N_BANDS, grid.win_h, grid.width), dtype=np.float32)
        self.std_strip = np.zeros_like(self.strip) if std else None
        self.std = np.empty((N_BANDS, grid.height, grid.width), dtype=np.float32) if std else None
        self.row, self.in_row, self.received = 0, 0, 0
        self.model_s = 0.0
        self.cpu_fallback = False
        self.quality = RowQuality() if quality else None
        self.change = ChangeSum()

    def add(self, index: int, y: np.ndarray, model_s: float, cpu_fallback: bool,
            std: np.ndarray | None = None) -> bool:
        """Blend one window's opt_v2 (and its std, when the assembly keeps one) in; True when it was the tile's last."""
        i, j = divmod(index, len(self.grid.xs))
        if i != self.row:
            raise RuntimeError(f"{self.tile.name}: window {index + 1} arrived before window row {self.row + 1} "
                               "was complete")
        x = self.grid.xs[j]
        w = self.weights[:y.shape[1], :y.shape[2]]
        region = self.strip[:, :y.shape[1], x:x + y.shape[2]]
        region += y * w
        if self.std_strip is not None:
            self.std_strip[:, :y.shape[1], x:x + y.shape[2]] += std * w
        self.received += 1
        self.model_s += model_s
        self.cpu_fallback |= cpu_fallback
        self.in_row += 1
        if self.in_row == len(self.grid.xs):
            self._finish_row()
        return self.received == self.grid.count

    def _finish_row(self) -> None:
        ys, i = self.grid.ys, self.row
        r0, r1 = ys[i], ys[i + 1] if i + 1 < len(ys) else self.grid.height
        n = r1 - r0
        sums = np.outer(self.row_sums[r0:r1], self.col_sums).astype(np.float32)
        out = self.strip[:, :n] / sums
        np.clip(out, 0.0, 1.0, out=out)          # a weighted mean of values in [0, 1]; guards rounding
        v1 = self.tile.array[:, r0:r1]
        nodata = None if self.tile.nodata is None else self.tile.nodata[r0:r1]
        valid = None if nodata is None else ~nodata
        if self.quality is not None:
            self.quality.add(v1, out, valid)
        self.change.add(v1, out, valid)
        if nodata is not None:
            out[:, nodata] = np.nan                # no data in, no data out (SPEC 9)
        v1[...] = out
        if self.std is not None:
            spread = self.std[:, r0:r1]
            np.divide(self.std_strip[:, :n], sums, out=spread)
            if nodata is not None:
                spread[:, nodata] = np.nan
        keep = self.strip.shape[1] - n            # rows the next window row has partly summed already
        for strip in (self.strip, self.std_strip):
            if strip is not None:
                strip[:, :keep] = strip[:, n:]
                strip[:, keep:] = 0.0
        self.row, self.in_row = i + 1, 0

    def result(self) -> tuple[np.ndarray, dict[str, float | None] | None]:
        """The tile's opt_v2 (in its input's array, which it has replaced) and its quality; its std and
        change stay in `std` and `change`."""
        if self.received != self.grid.count:
            raise RuntimeError(f"{self.tile.name}: {self.received} of {self.grid.count} windows")
        self.strip = self.std_strip = None
        return self.tile.array, None if self.quality is None else self.quality.finish()


class Assembler:
    """The writer's open assemblies, by tile name (a tile's windows all arrive on one rank, in order)."""

    def __init__(self, quality: bool) -> None:
        self.quality = quality
        self._open: dict[str, Assembly] = {}

    def add(self, windows: list[Window], outputs: list[np.ndarray], model_s: float,
            cpu_fallback: list[bool], stds: list[np.ndarray] | None = None) -> Iterator[Assembly]:
        """Blend each window in (and its std, where `stds` has them); yield the assemblies whose last
        window this was."""
        spreads = stds if stds else [None] * len(windows)
        for window, y, fallback, std in zip(windows, outputs, cpu_fallback, spreads, strict=True):
            name = window.tile.name
            asm = self._open.get(name)
            if asm is None:
                asm = self._open[name] = Assembly(window.tile, window.grid, self.quality, std is not None)
            if asm.add(window.index, y, model_s, fallback, std):
                del self._open[name]
                yield asm

    @property
    def pending(self) -> list[str]:
        return sorted(self._open)
