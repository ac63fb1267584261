"""Score finished Stage 2 outputs and their Stage 1 inputs against the true optical tiles.

For every finished output in `output_dir` (its opt_v2 as `stage2.read_output` reads it: the NPZ, or
the COG `<stem>.tif` of an output_format=cog run), the Stage 1 input `input_dir/<stem>.npz` (opt_v1,
or a GeoTIFF where there is no NPZ) and the truth `truth_dir/<stem>.npz` (key `target`, or `opt_v1`
for a folder of optical tiles) are scored with `stage2.quality.compare`, which training validation
uses too: RMSE and PSNR of the reflectance, the guide's NDVI RMSE and edge preservation, all against
the truth. No torch; local folders only (the app mirrors bucket folders first).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..formats import geotiff
from ..product import COG_SUFFIX, NPZ_SUFFIX, OUTPUT_KEY, json_key, read_output
from ..quality import LOWER_IS_BETTER, METRICS, compare
from ..runtime import RunError, require_dir
from ..tiles import INPUT_KEY, TileError, discover, tile_name

TRUTH_KEYS = ("target", INPUT_KEY)      # a pairs file's truth, or a folder of optical tiles


@dataclass
class TileScore:
    name: str
    before: dict[str, float | None]    # opt_v1 against the truth
    after: dict[str, float | None]     # opt_v2 against the truth


@dataclass
class Evaluation:
    truth_dir: str
    input_dir: str
    output_dir: str
    tiles: list[TileScore] = field(default_factory=list)

    def mean(self, which: str, metric: str) -> float | None:
        vals = [getattr(t, which)[metric] for t in self.tiles]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        return float(np.mean(vals)) if vals else None

    def improved(self, metric: str = "rmse") -> int:
        """How many tiles the output brought closer to the truth by `metric`."""
        n = 0
        for t in self.tiles:
            b, a = t.before[metric], t.after[metric]
            if b is not None and a is not None:
                n += (a < b) if LOWER_IS_BETTER[metric] else (a > b)
        return n

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "mean": {w: {m: self.mean(w, m) for m in METRICS} for w in ("before", "after")},
                "improved": {m: self.improved(m) for m in METRICS}}

    def format(self) -> str:
        """The one-screen table: per tile and mean, before (opt_v1) -> after (opt_v2)."""
        def f(v: float | None, nd: int) -> str:
            return "   n/a" if v is None else f"{v:.{nd}f}"
        width = max([len(t.name) for t in self.tiles] + [10])
        head = (f"{'tile':<{width}}  {'RMSE v1':>8} {'RMSE v2':>8}  {'NDVI-RMSE v1':>12} {'NDVI-RMSE v2':>12}"
                f"  {'PSNR v1':>7} {'PSNR v2':>7}  {'edge v1':>7} {'edge v2':>7}")
        lines = ["stage2 evaluation against the truth (v1 = Stage 1 input, v2 = Stage 2 output; "
                 "lower RMSE, higher PSNR and edge = closer)", head, "-" * len(head)]
        rows = [(t.name, t.before, t.after) for t in self.tiles]
        rows.append(("-" * len(head), None, None))
        rows.append(("mean", {m: self.mean("before", m) for m in METRICS}, {m: self.mean("after", m) for m in METRICS}))
        for name, b, a in rows:
            if b is None:
                lines.append(name)
                continue
            lines.append(f"{name:<{width}}  {f(b['rmse'], 4):>8} {f(a['rmse'], 4):>8}  {f(b['ndvi_rmse'], 4):>12} "
                         f"{f(a['ndvi_rmse'], 4):>12}  {f(b['psnr'], 2):>7} {f(a['psnr'], 2):>7}  "
                         f"{f(b['edge_preservation'], 3):>7} {f(a['edge_preservation'], 3):>7}")
        lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        n = len(self.tiles)
        b, a = self.mean("before", "rmse"), self.mean("after", "rmse")
        nb, na = self.mean("before", "ndvi_rmse"), self.mean("after", "ndvi_rmse")
        if b is None or a is None:
            return "no tiles compared"
        word = "closer to" if a < b else "NOT closer to"
        change = f"{100 * (a - b) / b:+.1f} %" if b > 0 else "n/a"
        return (f"Stage 2 output is {word} the truth: mean RMSE {b:.4f} -> {a:.4f} ({change}), "
                f"mean NDVI RMSE {nb:.4f} -> {na:.4f}; RMSE improved on {self.improved('rmse')} of {n} tiles")


def _read(path: Path, keys: tuple[str, ...], what: str) -> np.ndarray:
    if not path.is_file():
        raise RunError(f"{what} {path} does not exist: every output tile needs its {what} with the same name")
    try:
        with np.load(path, allow_pickle=False) as npz:
            for k in keys:
                if k in npz.files:
                    return np.asarray(npz[k], dtype=np.float32)
            found = list(npz.files)
    except RunError:
        raise
    except Exception as e:
        raise RunError(f"{what} {path} is unreadable ({type(e).__name__}: {e})") from None
    raise RunError(f"{what} {path} has no {' or '.join(repr(k) for k in keys)} array (found {found})")


def _read_input(input_dir: Path, name: str) -> np.ndarray:
    """The Stage 1 input of `name`: `<name>.npz`, or a float GeoTIFF `<name>.tif`/`.tiff` where there is no NPZ."""
    npz = input_dir / f"{name}.npz"
    tifs = [p for p in (input_dir / f"{name}{s}" for s in geotiff.SUFFIXES) if p.is_file()]
    if npz.is_file() or not tifs:
        return _read(npz, (INPUT_KEY,), "input")
    try:
        with geotiff.GeoTiff(tifs[0], input_scale=None, input_offset=None) as tif:
            return tif.read()
    except TileError as e:
        raise RunError(f"input {tifs[0]} cannot be read: {e.reason} ({e.hint})") from None


def _read_output(output_dir: Path, name: str) -> np.ndarray:
    """opt_v2 of `name` as stage2.read_output reads it: the NPZ, or the COG of an output_format=cog run."""
    try:
        return read_output(output_dir / name).layers[OUTPUT_KEY]
    except TileError as e:
        raise RunError(f"output {output_dir / name} cannot be read: {e.reason} ({e.hint})") from None


def tile_arrays(ev: Evaluation, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, opt_v1, opt_v2) of tile `name` from `ev`'s folders, which must cover the same pixels."""
    truth = _read(Path(ev.truth_dir) / f"{name}.npz", TRUTH_KEYS, "truth")
    v1, v2 = _read_input(Path(ev.input_dir), name), _read_output(Path(ev.output_dir), name)
    if not truth.shape == v1.shape == v2.shape:
        raise RunError(f"tile {name}: shapes differ (truth {truth.shape}, input {v1.shape}, output "
                       f"{v2.shape}): the truth must cover the same pixels as the Stage 1 tile")
    return truth, v1, v2


def _finished(output_dir: Path) -> list[str]:
    """Names with an output JSON and its data file (NPZ or COG), sorted."""
    files, _ = discover(output_dir, suffixes=(NPZ_SUFFIX, COG_SUFFIX))
    names = {tile_name(f, output_dir) for f in files}
    return sorted(n for n in names if (output_dir / json_key(n)).is_file())


def evaluate_dirs(truth_dir: str | Path, input_dir: str | Path, output_dir: str | Path) -> Evaluation:
    """Score every finished output tile of `output_dir` (sorted by name) against its truth and input."""
    truth_dir, input_dir, output_dir = Path(truth_dir), Path(input_dir), Path(output_dir)
    for key, d in (("truth_dir", truth_dir), ("input_dir", input_dir), ("output_dir", output_dir)):
        require_dir(d, key, f"pass {key}=DIR")
    names = _finished(output_dir)
    if not names:
        raise RunError(f"No finished Stage 2 outputs in {output_dir}: run python -m stage2.predict first")
    ev = Evaluation(str(truth_dir), str(input_dir), str(output_dir))
    for name in names:
        truth, v1, v2 = tile_arrays(ev, name)
        ev.tiles.append(TileScore(name, compare(truth, v1), compare(truth, v2)))
    return ev
