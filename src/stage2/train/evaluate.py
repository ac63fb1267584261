"""Did Stage 2 help? Compare Stage 1 inputs and Stage 2 outputs against the true optical tiles.

`python -m stage2.evaluate truth_dir=DIR input_dir=DIR output_dir=DIR` reads, for every finished
output `output_dir/<stem>.npz` (opt_v2), the Stage 1 input `input_dir/<stem>.npz` (opt_v1) and
the truth `truth_dir/<stem>.npz` (key `target`, or `opt_v1` for a folder of optical tiles), and
prints per tile and on average the error of the input and of the output: RMSE and PSNR of the
reflectance, the guide's NDVI RMSE and edge preservation (stage2.quality), all against the truth.
The table is also saved as `output_dir/_stage2_evaluation.json`, and one PNG per tile
(truth | opt_v1 | opt_v2 | their errors) goes to `output_dir/_stage2_evaluation/` (`figures=false`: none).
Settings: conf/evaluate.yaml.

Only useful where a truth exists: a benchmark, a validation site, or Stage 1 stand-ins made with
`stage2.degrade`. The figures come from `stage2.quality.compare`, which training validation uses too.
Pure numpy (no torch).
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from ..formats import cog, geotiff
from ..quality import LOWER_IS_BETTER, METRICS, compare
from ..runtime import RunError, guarded, hydra_main, require_dir, required
from ..storage import Folder, mirrored
from ..tiles import INPUT_KEY, OUTPUT_KEY, TileError, discover, tile_name

EVALUATION_FILE = "_stage2_evaluation.json"
FIGURES_DIR = "_stage2_evaluation"


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
    """opt_v2 of `name`: `<name>.npz`, or the COG `<name>.tif` of an output_format=cog run."""
    tif = output_dir / cog.output_key(name)
    if (output_dir / f"{name}.npz").is_file() or not tif.is_file():
        return _read(output_dir / f"{name}.npz", (OUTPUT_KEY,), "output")
    try:
        return cog.read_cog(tif).array
    except TileError as e:
        raise RunError(f"output {tif} cannot be read: {e.reason} ({e.hint})") from None


def _finished(output_dir: Path) -> list[str]:
    """Names with an output JSON and its data file (NPZ or COG), sorted."""
    files, _ = discover(output_dir, suffixes=(".npz", cog.SUFFIX))
    names = {tile_name(f, output_dir) for f in files}
    return sorted(n for n in names if (output_dir / f"{n}.json").is_file())


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
        truth = _read(truth_dir / f"{name}.npz", ("target", INPUT_KEY), "truth")
        v1, v2 = _read_input(input_dir, name), _read_output(output_dir, name)
        if not truth.shape == v1.shape == v2.shape:
            raise RunError(f"tile {name}: shapes differ (truth {truth.shape}, input {v1.shape}, output "
                                  f"{v2.shape}): the truth must cover the same pixels as the Stage 1 tile")
        ev.tiles.append(TileScore(name, compare(truth, v1), compare(truth, v2)))
    return ev


def comparison_figure(path: Path, name: str, truth: np.ndarray, v1: np.ndarray, v2: np.ndarray,
                      before: dict[str, float | None], after: dict[str, float | None]) -> Path:
    """truth | opt_v1 | opt_v2 RGB (the report's display) and |v1 - truth|, |v2 - truth| on one scale."""
    from matplotlib.figure import Figure

    from ..report.figures import display_gain, rgb

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
    """One comparison PNG per evaluated tile in `folder`."""
    folder = Path(folder)
    out = []
    for t in ev.tiles:
        truth = _read(Path(ev.truth_dir) / f"{t.name}.npz", ("target", INPUT_KEY), "truth")
        v1, v2 = _read_input(Path(ev.input_dir), t.name), _read_output(Path(ev.output_dir), t.name)
        out.append(comparison_figure(folder / f"{t.name}.png", t.name, truth, v1, v2, t.before, t.after))
    return out


def evaluate_app(cfg: DictConfig) -> int:
    """The evaluate command's steps: score, print the table, save the JSON and the figures.

    Any of the three folders may be an fsspec URL (SPEC 10): its files are downloaded for the scoring
    (every tile is read anyway), and the JSON and figures are uploaded into a bucket output_dir.
    """
    dirs = {k: required(cfg, k, what) for k, what in (("truth_dir", "the true optical tiles"),
                                                        ("input_dir", "the Stage 1 tiles the run read"),
                                                        ("output_dir", "the Stage 2 run's output_dir"))}
    with ExitStack() as stack:
        local = {k: stack.enter_context(mirrored(v, skip=lambda key: key.startswith(f"{FIGURES_DIR}/")))
                 for k, v in dirs.items()}
        ev = evaluate_dirs(**local)
        out = Folder(dirs["output_dir"])
        made = local["output_dir"] if out.local else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="stage2-eval-")))
        figs = write_figures(ev, made / FIGURES_DIR) if cfg.figures else []
        if not out.local:
            out.upload(made, [p.relative_to(made).as_posix() for p in figs])
        ev.truth_dir, ev.input_dir, ev.output_dir = (str(dirs[k]) for k in ("truth_dir", "input_dir", "output_dir"))
    print(ev.format())
    if cfg.save:
        text = json.dumps(_finite(ev.to_json()), indent=2, allow_nan=False) + "\n"
        print(f"saved {out.write_bytes(EVALUATION_FILE, text.encode('utf-8'))}")
    if cfg.figures:
        print(f"figures: {len(figs)} PNGs (truth | opt_v1 | opt_v2 | errors) in {out.uri(FIGURES_DIR)}")
    return 0


def run(cfg: DictConfig) -> int:
    """Score the run and print the table; exit code 0, or 2 on a bad folder or tile."""
    return guarded(lambda: evaluate_app(cfg), cfg, prog="stage2.evaluate")


main = hydra_main("evaluate", run)


def _finite(v: Any) -> Any:
    """JSON has no inf/NaN (identical tiles have an infinite PSNR): write null instead."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v

