"""The report's checks: compare a Stage 2 run's inputs with its outputs and validate every output (docs/output.md).

Read-only and pure numpy: counts (every input has a complete output and every output has an input,
with the failure reason from `_stage2_failures.jsonl` where the run recorded one), every output's
JSON and NPZ against docs/output.md, and each tile's quality (from its JSON, or computed here for runs with
`quality=false`). The page and the terminal lines are made from the RunCheck this returns.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import formats
from ..formats import INPUT_SUFFIXES, cog
from ..product import OUTPUT_KEY, STAGE, STD_COG_SUFFIX, STD_KEY
from ..quality import below_target, severity, tile_quality
from ..store import FAILURES_FILE, SUMMARY_FILE
from ..tiles import BANDS, N_BANDS, TileError, discover, is_reserved, tile_name

REQUIRED_KEYS = ("stage", "timestamp", "processing")


class OutputInvalid(Exception):
    """One output that does not meet docs/output.md (the reason is the message)."""


@dataclass
class TileRow:
    """One complete, valid output as the table shows it."""

    name: str
    month: Any
    biome: Any
    ndvi_rmse: float | None
    edge_preservation: float | None
    quality_from: str                   # "json" (written by the run), "computed" (here) or "none"
    png: str | None = None              # path relative to report_dir
    std_mean: float | None = None       # mean of opt_v2_std over bands and valid pixels (runs with TTA)
    mean_change: float | None = None    # mean |opt_v2 - opt_v1| over bands and valid pixels

    @property
    def quality(self) -> dict[str, float | None]:
        return {"ndvi_rmse": self.ndvi_rmse, "edge_preservation": self.edge_preservation}

    @property
    def below(self) -> bool:
        return below_target(self.quality)

    @property
    def flat(self) -> bool:
        return self.quality_from != "none" and self.edge_preservation is None


@dataclass
class Problem:
    name: str
    kind: str            # missing output | incomplete output | invalid output | output without input
    detail: str

    def line(self) -> str:
        return f"{self.kind}: {self.name}: {self.detail}"


@dataclass
class RunCheck:
    """Everything the report found; the page and the terminal lines are made from this."""

    input_dir: Path
    output_dir: Path
    inputs: int = 0
    input_paths: dict[str, Path] = field(default_factory=dict)   # tile name -> input NPZ
    outputs: int = 0                      # complete outputs (JSON and NPZ) that have an input
    rows: list[TileRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)   # unreadable summary/failures files
    shown: tuple[str, str] | None = None  # (input_dir, output_dir) as the user named them: URLs of a bucket run

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------- reading
def _no_nan(const: str) -> float:
    raise ValueError(f"{const} is not valid JSON")


def _load_json(path: Path) -> Any:
    """Strict JSON (NaN/Infinity rejected, as docs/output.md forbids them)."""
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_nan)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def output_names(output_dir: Path, recursive: bool, report_dir: Path) -> tuple[set[str], set[str]]:
    """Names that have an output JSON / data file, NPZ or COG (hidden files, the run's own files and the
    report excluded)."""
    pattern = "**/*" if recursive else "*"
    skip = report_dir.resolve()
    jsons: set[str] = set()
    npzs: set[str] = set()
    for suffix, into in ((".json", jsons), (".npz", npzs), (cog.SUFFIX, npzs)):
        for p in output_dir.glob(pattern + suffix):
            rel = p.relative_to(output_dir)
            if any(part.startswith(".") for part in rel.parts) or is_reserved(rel.as_posix()):
                continue
            if p.name.lower().endswith(STD_COG_SUFFIX):     # the std layer of the COG output `<name>.tif`
                continue
            if recursive and p.resolve().is_relative_to(skip):
                continue
            if p.is_file():
                into.add(rel.with_suffix("").as_posix())
    return jsons, npzs


def read_failures(output_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The run's `_stage2_failures.jsonl` (a line that is not a JSON object is kept as its raw text)."""
    path = output_dir / FAILURES_FILE
    if not path.is_file():
        return [], []
    failures, notes = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError:
            notes.append(f"{FAILURES_FILE} line {i} is not a JSON object: {line[:200]}")
            entry = {"file": "?", "reason": line[:500], "hint": ""}
        failures.append(entry)
    return failures, notes


def read_summary(output_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    path = output_dir / SUMMARY_FILE
    if not path.is_file():
        return None, []
    try:
        data = _load_json(path)
    except (ValueError, OSError) as e:
        return None, [f"{SUMMARY_FILE} could not be read: {e}"]
    if not isinstance(data, dict):
        return None, [f"{SUMMARY_FILE} holds a JSON {type(data).__name__}, not an object"]
    return data, []


def _failure_for(name: str, failures: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The failure entry whose input path is `<...>/<name>.npz` or `.tif`/`.tiff` (paths may be relative
    to another cwd)."""
    for f in failures:
        path = Path(str(f.get("file", "")))
        if path.suffix.lower() not in INPUT_SUFFIXES:
            continue
        stem = path.with_suffix("").as_posix()
        if stem == name or stem.endswith("/" + name):
            return f
    return None


def check_output(output_dir: Path, name: str, input_shape: tuple[int, ...] | None
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Validate one complete output against docs/output.md (and its std layer against docs/confidence.md); return its
    metadata and layers."""
    js, npz = output_dir / f"{name}.json", output_dir / f"{name}.npz"
    try:
        meta = _load_json(js)
    except UnicodeDecodeError:
        raise OutputInvalid(f"{js.name} is not UTF-8 text") from None
    except ValueError as e:
        raise OutputInvalid(f"{js.name} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise OutputInvalid(f"{js.name} holds a JSON {type(meta).__name__}, not an object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise OutputInvalid(f"{js.name} lacks {', '.join(missing)}")
    if meta["stage"] != STAGE:
        raise OutputInvalid(f"{js.name} has stage {meta['stage']!r}, expected {STAGE!r}")
    q = meta.get("quality")
    if q is not None:
        if not isinstance(q, dict):
            raise OutputInvalid(f"{js.name}: quality is a {type(q).__name__}, not an object")
        for key, ok in (("ndvi_rmse", lambda v: v >= 0), ("edge_preservation", lambda v: -1 <= v <= 1)):
            v = q.get(key)
            if v is not None and not (_is_number(v) and ok(v)):
                raise OutputInvalid(f"{js.name}: quality.{key} is {v!r}")
    npz, layers = read_layers(output_dir, name)
    v2 = layers[OUTPUT_KEY]
    if v2.dtype != np.float32:
        raise OutputInvalid(f"{npz.name}: {OUTPUT_KEY} is {v2.dtype}, expected float32")
    if v2.ndim != 3 or v2.shape[0] != N_BANDS:
        raise OutputInvalid(f"{npz.name}: {OUTPUT_KEY} has shape {v2.shape}, expected ({N_BANDS}, H, W)")
    if input_shape is not None and len(input_shape) == 3 and tuple(v2.shape[1:]) != tuple(input_shape[1:]):
        raise OutputInvalid(f"{npz.name}: {OUTPUT_KEY} is {v2.shape[1]}x{v2.shape[2]} px, "
                            f"the input is {input_shape[1]}x{input_shape[2]}")
    _check_no_data(npz.name, v2, meta)
    lo, hi = float(np.fmin.reduce(v2, axis=None)), float(np.fmax.reduce(v2, axis=None))
    if lo < 0 or hi > 1:
        raise OutputInvalid(f"{npz.name}: values in [{lo:.4g}, {hi:.4g}], outside [0, 1]")
    std = layers.get(STD_KEY)
    if std is not None:
        if std.shape != v2.shape:
            raise OutputInvalid(f"{npz.name}: {STD_KEY} has shape {std.shape}, {OUTPUT_KEY} {v2.shape}")
        if float(np.fmin.reduce(std, axis=None)) < 0:
            raise OutputInvalid(f"{npz.name}: {STD_KEY} has negative values")
    return meta, layers


def read_layers(output_dir: Path, name: str) -> tuple[Path, dict[str, np.ndarray]]:
    """The output's data file and its layers (opt_v2, and opt_v2_std where the run had TTA): the NPZ,
    or the COGs where the run wrote no NPZ (output_format=cog)."""
    from ..product import read_output

    npz = output_dir / f"{name}.npz"
    source = npz if npz.is_file() else output_dir / cog.output_key(name)
    try:
        return source, read_output(source).layers
    except TileError as e:
        raise OutputInvalid(e.reason) from None


def read_opt_v2(output_dir: Path, name: str) -> tuple[Path, np.ndarray]:
    """The output's data file and its opt_v2."""
    source, layers = read_layers(output_dir, name)
    return source, layers[OUTPUT_KEY]


def _check_no_data(name: str, v2: np.ndarray, meta: dict[str, Any]) -> None:
    """No Inf; NaN only on whole pixels, exactly as many as the run masked (nan_policy=mask, docs/large-tiles.md)."""
    finite = np.isfinite(v2)
    if finite.all():
        return
    proc = meta.get("processing")
    masked = proc.get("masked_pixels") if isinstance(proc, dict) else None
    masked = masked if isinstance(masked, int) and not isinstance(masked, bool) else 0
    nan = np.isnan(v2)
    bad = int(v2.size - finite.sum())
    if not masked or bad != int(nan.sum()):
        raise OutputInvalid(f"{name}: {bad} NaN/Inf values")
    pixels = nan.any(axis=0)
    if not nan.all(axis=0)[pixels].all() or int(pixels.sum()) != masked:
        raise OutputInvalid(f"{name}: NaN on {int(pixels.sum())} pixels (in some bands only: "
                            f"{int((pixels & ~nan.all(axis=0)).sum())}), but processing.masked_pixels is {masked}")


def _confidence_of(meta: dict[str, Any], layers: dict[str, np.ndarray], input_path: Path
                   ) -> tuple[float | None, float | None]:
    """The tile's std mean and mean change: the run's own (`confidence` in the JSON), or computed here
    where a run with a std layer wrote none. The mean of the per-band std means is the std's mean:
    every band has the same valid pixels."""
    c = meta.get("confidence")
    c = c if isinstance(c, dict) else {}
    bands = [c.get(b) for b in BANDS]
    std_mean = (float(np.mean([b["std_mean"] for b in bands])) if all(
        isinstance(b, dict) and _is_number(b.get("std_mean")) for b in bands) else None)
    change = c.get("mean_abs_change") if _is_number(c.get("mean_abs_change")) else None
    std = layers.get(STD_KEY)
    if std is None:
        return std_mean, change
    if std_mean is None:
        std_mean = float(np.nanmean(std, dtype=np.float64))
    if change is None:
        try:
            tile = formats.read_tile(input_path, nan_policy="mask", input_scale=None, input_offset=None)
        except (TileError, OSError):
            return std_mean, None
        change = mean_change(tile.array, layers[OUTPUT_KEY], tile.nodata)
    return std_mean, change


def change_map(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """|opt_v2 - opt_v1| per pixel, the mean over the four bands (NaN where either has no data): its
    mean over the pixels is the JSON's `confidence.mean_abs_change`, so the map and the number agree.
    Band by band: a large tile needs two (H, W) arrays, not four."""
    out = np.zeros(np.shape(v1)[1:], np.float32)
    for a, b in zip(v1, v2, strict=True):
        out += np.abs(np.subtract(b, a, dtype=np.float32))
    return out / len(v1)


def mean_change(v1: np.ndarray, v2: np.ndarray, nodata: np.ndarray | None = None) -> float | None:
    """Mean |opt_v2 - opt_v1| over the bands and the pixels with data (`nodata`: the input's mask)."""
    d = change_map(v1, v2)
    ok = np.isfinite(d) if nodata is None else np.isfinite(d) & ~nodata
    return float(d[ok].mean(dtype=np.float64)) if ok.any() else None


def _quality_of(meta: dict[str, Any], v2: np.ndarray, input_path: Path) -> tuple[dict[str, Any], str]:
    """The tile's metrics: the run's own (no second computation) or, for quality=false runs, computed."""
    q = meta.get("quality")
    if isinstance(q, dict) and "ndvi_rmse" in q and "edge_preservation" in q:
        return q, "json"
    try:
        v1 = formats.read_tile(input_path, input_scale=None, input_offset=None).array
    except (TileError, OSError):
        return {"ndvi_rmse": None, "edge_preservation": None}, "none"
    return tile_quality(v1, v2), "computed"


def check_run(input_dir: Path, output_dir: Path, report_dir: Path, recursive: bool) -> RunCheck:
    """Compare inputs with outputs and validate every output (reads each output once)."""
    chk = RunCheck(input_dir, output_dir)
    files, _ = discover(input_dir, recursive, suffixes=INPUT_SUFFIXES)
    inputs = {tile_name(f, input_dir): f for f in files}
    jsons, npzs = output_names(output_dir, recursive, report_dir)
    chk.failures, notes = read_failures(output_dir)
    chk.summary, notes2 = read_summary(output_dir)
    chk.notes = notes + notes2
    chk.inputs = len(inputs)
    chk.input_paths = inputs
    for name, path in inputs.items():
        if name in jsons and name in npzs:
            try:
                meta, layers = check_output(output_dir, name, formats.peek_shape(path))
            except OutputInvalid as e:
                chk.problems.append(Problem(name, "invalid output", str(e)))
                continue
            chk.outputs += 1
            q, source = _quality_of(meta, layers[OUTPUT_KEY], path)
            std_mean, change = _confidence_of(meta, layers, path)
            chk.rows.append(TileRow(name, meta.get("month"), meta.get("biome_code"), q["ndvi_rmse"],
                                    q["edge_preservation"], source, std_mean=std_mean, mean_change=change))
        elif name in npzs:
            kind = "NPZ" if (output_dir / f"{name}.npz").is_file() else "COG"
            chk.problems.append(Problem(name, "incomplete output", f"{kind} without its JSON (the run was "
                                        "interrupted): rerun predict with skip_existing=true"))
        elif name in jsons:
            chk.problems.append(Problem(name, "incomplete output", "JSON without its NPZ or COG: delete the JSON "
                                        "and rerun predict with skip_existing=true"))
        else:
            f = _failure_for(name, chk.failures)
            detail = (f"the run failed this tile: {f.get('reason')} ({f.get('hint')})" if f else
                      "no output and no recorded failure: was predict run over this input_dir? "
                      "rerun it with skip_existing=true")
            chk.problems.append(Problem(name, "missing output", detail))
    for name in sorted((jsons | npzs) - set(inputs)):
        chk.problems.append(Problem(name, "output without input",
                                    f"no {name}.npz or {name}.tif in {input_dir}: is this the run's input_dir?"))
    return chk


# ---------------------------------------------------------------------------- writing
def worst_first(rows: list[TileRow]) -> list[TileRow]:
    return sorted(rows, key=lambda r: (-severity(r.quality), r.name))
