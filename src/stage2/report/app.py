"""`python -m stage2.report input_dir=... output_dir=... [report_dir=...] [max_tiles=N]` (docs/usage.md#quality).

A read-only check of a finished Stage 2 run, and the pictures a person needs to trust it:
- counts: every input has a complete output and every output has an input (names listed either way,
  with the failure reason from `_stage2_failures.jsonl` where the run recorded one);
- every output: JSON an object with the Stage 2 keys and no NaN, NPZ `opt_v2` float32 (4, H, W) with
  the input's H and W, finite, in [0, 1];
- per tile quality: from the output JSON, or computed here when the run had `quality=false`; it
  compares opt_v2 with opt_v1, so it measures how much Stage 2 changed the tile, not its error;
- per tile the mean change |opt_v2 - opt_v1| and, for runs with TTA, the std mean (docs/confidence.md);
- `report_dir/tiles/<name>.png` (worst quality first, up to max_tiles), `quality.png`, `index.html`.

Exit 0 when everything checks out, 1 when counts do not match or an output is invalid (the report is
still written and says which), 2 for run-level problems (a folder missing) with one line naming it.
The last line printed is `report: <absolute path>/index.html`.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from .. import CONF_DIR, formats
from ..formats import INPUT_SUFFIXES
from ..product import OUTPUT_KEY, STD_KEY
from ..runtime import RunError, atomic_write_text, exit_with, guarded, register_resolvers, require_dir
from ..store import is_url, mirrored, open_store
from ..tiles import TileError, discover
from .check import OutputInvalid, RunCheck, check_run, read_layers, worst_first

register_resolvers()      # report.yaml's ${stage2_aoi_dir:...}

INDEX_FILE = "index.html"
QUALITY_PNG = "quality.png"
TILES_DIR = "tiles"
SHOW_PROBLEMS = 20          # problems printed on the terminal; index.html lists all
CHANGE_NOT_ERROR = ("these compare opt_v2 with opt_v1: they measure how much Stage 2 changed a tile, not its error; "
                    "error needs a truth: python -m stage2.evaluate truth_dir=DIR input_dir=... output_dir=...")


def draw_tiles(chk: RunCheck, report_dir: Path, max_tiles: int) -> int:
    """One comparison PNG per tile, most changed first (distance from the preservation targets), up to
    max_tiles; returns how many."""
    from .figures import tile_figure

    tiles_dir = report_dir / TILES_DIR
    if tiles_dir.is_dir():                 # PNGs of an earlier report would be stale
        for old in tiles_dir.rglob("*.png"):
            old.unlink()
    n = 0
    for row in worst_first(chk.rows)[:max_tiles]:
        try:
            tile = formats.read_tile(chk.input_paths[row.name], nan_policy="mask", input_scale=None,
                                     input_offset=None)
            layers = read_layers(chk.output_dir, row.name)[1]
            v1, v2, std = tile.array, layers[OUTPUT_KEY], layers.get(STD_KEY)
            if tile.nodata is not None:
                v1[:, tile.nodata] = np.nan        # draw no data as no data, not as its fill
        except (TileError, OutputInvalid, OSError, KeyError, ValueError) as e:
            chk.notes.append(f"no figure for {row.name}: {e}")
            continue
        rel = f"{TILES_DIR}/{row.name}.png"
        tile_figure(report_dir / rel, row.name, v1, v2, row.month, row.biome, row.ndvi_rmse,
                    row.edge_preservation, row.below, std=std)
        row.png = rel
        n += 1
    return n


def terminal_lines(chk: RunCheck, n_png: int) -> list[str]:
    """What the report prints (before the final `report:` line)."""
    rmse = [r.ndvi_rmse for r in chk.rows if r.ndvi_rmse is not None]
    edge = [r.edge_preservation for r in chk.rows if r.edge_preservation is not None]
    lines = ["stage2 report",
             f"  tiles     inputs {chk.inputs}   complete outputs {chk.outputs}   problems {len(chk.problems)}"
             f"   run failures {len(chk.failures)}"]
    if rmse or edge:
        lines.append(f"  change    NDVI RMSE mean {_mean(rmse)} worst {_fmt(max(rmse, default=None))}   "
                     f"edge pres. mean {_mean(edge)} worst {_fmt(min(edge, default=None))}   (against opt_v1)")
        lines.append(f"            {sum(r.below for r in chk.rows)} tiles changed more than the guide's preservation "
                     f"targets, {sum(r.flat for r in chk.rows)} flat (edge preservation undefined)")
        lines.append(f"            {CHANGE_NOT_ERROR}")
    std = [r.std_mean for r in chk.rows if r.std_mean is not None]
    change = [r.mean_change for r in chk.rows if r.mean_change is not None]
    if std or change:
        lines.append(f"  confidence  mean change |opt_v2 - opt_v1| {_mean(change)}" +
                     (f"   std across TTA passes: mean {_mean(std)} worst {_fmt(max(std))}" if std else ""))
    lines.append(f"  figures   {n_png} tile PNGs (most changed first), {QUALITY_PNG}")
    for p in chk.problems[:SHOW_PROBLEMS]:
        lines.append(f"  PROBLEM   {p.line()}")
    if len(chk.problems) > SHOW_PROBLEMS:
        lines.append(f"  ... and {len(chk.problems) - SHOW_PROBLEMS} more problems, all listed in {INDEX_FILE}")
    for note in chk.notes:
        lines.append(f"  note      {note}")
    return lines


def _mean(v: list[float]) -> str:
    return _fmt(sum(v) / len(v) if v else None)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def make_report(input_dir: Path, output_dir: Path, report_dir: Path, max_tiles: int,
                recursive: bool, shown: tuple[str, str] | None = None) -> tuple[RunCheck, Path, list[str]]:
    """Check the run and write the report; returns the check, index.html's path and the terminal lines.

    `shown`: input_dir and output_dir as the user named them, when these are local copies of a bucket's.
    """
    from .figures import summary_figure
    from .page import render_index

    for label, d in (("input_dir", input_dir), ("output_dir", output_dir)):
        require_dir(d, label, f"pass {label}=DIR of the Stage 2 run to report on")
    if not discover(input_dir, recursive, suffixes=INPUT_SUFFIXES)[0]:
        raise RunError(f"No tiles (*.npz, *.tif, *.tiff) found in {shown[0] if shown else input_dir}: "
                       "point input_dir at the Stage 1 tiles the run read")
    if max_tiles < 0:
        raise RunError(f"max_tiles={max_tiles}: pass 0 or more")
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"report_dir {report_dir} cannot be created: {e.strerror}") from None

    chk = check_run(input_dir, output_dir, report_dir, recursive)
    chk.shown = shown
    n_png = draw_tiles(chk, report_dir, max_tiles)
    rmse = [r.ndvi_rmse for r in chk.rows if r.ndvi_rmse is not None]
    edge = [r.edge_preservation for r in chk.rows if r.edge_preservation is not None]
    summary_figure(report_dir / QUALITY_PNG, rmse, edge, len(chk.rows), sum(r.flat for r in chk.rows))
    index = report_dir / INDEX_FILE
    atomic_write_text(index, render_index(chk, worst_first(chk.rows), QUALITY_PNG, max_tiles))
    return chk, index.resolve(), terminal_lines(chk, n_png)


def _local_folders(stack: ExitStack, cfg: DictConfig) -> tuple[Path, Path, Path]:
    """input_dir, output_dir and report_dir as local folders: a URL's files are downloaded for the report
    (it reads every tile anyway), and a report_dir URL is written locally, then uploaded."""
    recursive = bool(cfg.recursive)
    report = str(cfg.report_dir)
    inside = report[len(str(cfg.output_dir).rstrip("/")) + 1:] + "/" if report.startswith(str(cfg.output_dir)) else None
    inp = stack.enter_context(mirrored(cfg.input_dir, recursive))
    out = stack.enter_context(mirrored(cfg.output_dir, recursive, skip=lambda k: bool(inside) and k.startswith(inside)))
    if is_url(report):
        report_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stage2-report-")))
    else:
        report_dir = Path(report).expanduser()
    return inp, out, report_dir


def run(cfg: DictConfig) -> int:
    """One report; returns the exit code (0 all good, 1 counts/outputs wrong, 2 run-level error)."""
    def steps() -> int:
        if cfg.input_dir is None:
            raise RunError("input_dir is not set: pass input_dir=DIR (the Stage 1 tiles the run read)")
        if cfg.output_dir is None:
            raise RunError("output_dir is not set: pass output_dir=DIR (the Stage 2 run's output_dir)")
        try:
            max_tiles = int(cfg.max_tiles)
        except (TypeError, ValueError):
            raise RunError(f"max_tiles={cfg.max_tiles!r} is not a whole number") from None
        with ExitStack() as stack:
            inp, out, report_dir = _local_folders(stack, cfg)
            remote = is_url(cfg.input_dir) or is_url(cfg.output_dir)
            shown = (str(cfg.input_dir), str(cfg.output_dir)) if remote else None
            chk, index, lines = make_report(inp, out, report_dir, max_tiles, bool(cfg.recursive), shown)
            if is_url(cfg.report_dir):
                target = open_store(cfg.report_dir)
                target.upload(report_dir, [p.relative_to(report_dir).as_posix()
                                           for p in sorted(report_dir.rglob("*")) if p.is_file()])
                index = target.uri(INDEX_FILE)
        print("\n".join(lines))
        print(f"report: {index}", flush=True)
        return 0 if chk.ok else 1

    return guarded(steps, cfg, prog="stage2 report")


# An absolute config path: works for `python -m`, console scripts and `from stage2.report.app import main`.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="report")
def main(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    code = run(cfg)
    return code if HydraConfig.get().mode == RunMode.MULTIRUN else exit_with(code)
