"""Score finished Stage 2 outputs and their Stage 1 inputs against the true optical tiles.

For every finished output in `output_dir` (its layers as `stage2.read_output` reads them: the NPZ,
or the COG `<stem>.tif` of an output_format=cog run), the Stage 1 input `input_dir/<stem>.npz`
(opt_v1, or a GeoTIFF where there is no NPZ) and the truth `truth_dir/<stem>.npz` (key `target`, or
`opt_v1` for a folder of optical tiles) are scored with stage2.evaluate.metrics: RMSE, PSNR, SSIM,
SAM, the guide's NDVI RMSE and edge preservation, all against the truth and over the pixels with
data in all three. Beside the mean over tiles: the pooled RMSE and SAM (all valid pixels of all
tiles), the per-tile ratio RMSE(opt_v2) / RMSE(opt_v1) (median, worst, tiles worse by more than 2 %),
for outputs with a std (test-time augmentation) how well the std ranks the real error, and the RMSE
of another run's outputs (`reference_dir`, e.g. the same tiles without TTA). Local folders only (the
app mirrors bucket folders first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..formats import geotiff
from ..product import COG_SUFFIX, NPZ_SUFFIX, OUTPUT_KEY, STD_KEY, json_key, read_output
from ..quality import LOWER_IS_BETTER, METRICS
from ..runtime import RunError, require_dir
from ..tiles import INPUT_KEY, TileError, discover, tile_name
from .metrics import SPEARMAN_MAX_PIXELS, SPEARMAN_SEED, RankSample, Sums, pixel_spread, psnr_of, rmse_over, score
from .metrics import spearman as rank_correlation
from .metrics import valid_pixels

TRUTH_KEYS = ("target", INPUT_KEY)      # a pairs file's truth, or a folder of optical tiles
EVAL_METRICS = (*METRICS, "ssim", "sam")
LOWER = {**LOWER_IS_BETTER, "ssim": False, "sam": True}
WORSE_BY = 0.02                         # a tile whose RMSE ratio exceeds 1 + this got worse
# For scale only: DSen2-CR (Meraner et al. 2020, ISPRS J. Photogramm. Remote Sens. 166) on its own
# SEN12MS-CR test set, all 13 bands, removing real clouds: another task on other data.
LITERATURE = {"DSen2-CR": {"psnr": 28.7, "ssim": 0.875, "sam": 8.15,
                           "what": "cloud removal, Meraner et al. 2020, SEN12MS-CR test set, 13 bands"}}


@dataclass
class TileScore:
    name: str
    before: dict[str, float | None]    # opt_v1 against the truth
    after: dict[str, float | None]     # opt_v2 against the truth
    pixels: int = 0                    # pixels scored (with data in truth, opt_v1 and opt_v2)
    confidence: dict[str, Any] | None = None   # outputs with a std: std_mean, spearman, pixels
    reference: dict[str, float | None] | None = None   # reference_dir's output: its rmse

    @property
    def rmse_ratio(self) -> float | None:
        """RMSE(opt_v2) / RMSE(opt_v1): below 1 Stage 2 brought the tile closer to the truth."""
        b, a = self.before["rmse"], self.after["rmse"]
        return a / b if a is not None and b else None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "before": self.before, "after": self.after, "rmse_ratio": self.rmse_ratio,
                "pixels": self.pixels, "confidence": self.confidence, "reference": self.reference}


@dataclass
class Evaluation:
    truth_dir: str
    input_dir: str
    output_dir: str
    tiles: list[TileScore] = field(default_factory=list)
    reference_dir: str | None = None
    tta: str | None = None              # the outputs' processing.tta ("none" for runs without it)
    reference_tta: str | None = None
    pooled: dict[str, Any] = field(default_factory=dict)
    spearman_pooled: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

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
                n += (a < b) if LOWER[metric] else (a > b)
        return n

    def ratios(self) -> dict[str, Any]:
        """The per-tile RMSE ratios: median, worst (and its tile), and how many tiles got worse by more than 2 %."""
        got = [(t.rmse_ratio, t.name) for t in self.tiles if t.rmse_ratio is not None]
        if not got:
            return {"median": None, "worst": None, "worst_tile": None, "worse": 0, "worse_by": WORSE_BY, "tiles": 0}
        worst = max(got, key=lambda rn: (rn[0], rn[1]))
        return {"median": float(np.median([r for r, _ in got])), "worst": worst[0], "worst_tile": worst[1],
                "worse": sum(r > 1 + WORSE_BY for r, _ in got), "worse_by": WORSE_BY, "tiles": len(got)}

    def has_std(self) -> bool:
        return any(t.confidence is not None for t in self.tiles)

    def mean_of(self, part: str, key: str) -> float | None:
        """Mean over tiles of `confidence` or `reference` entries."""
        vals = [(getattr(t, part) or {}).get(key) for t in self.tiles]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    def to_json(self) -> dict[str, Any]:
        return {"truth_dir": self.truth_dir, "input_dir": self.input_dir, "output_dir": self.output_dir,
                "reference_dir": self.reference_dir, "tta": self.tta, "reference_tta": self.reference_tta,
                "tiles": [t.to_json() for t in self.tiles],
                "mean": {w: {m: self.mean(w, m) for m in EVAL_METRICS} for w in ("before", "after")},
                "improved": {m: self.improved(m) for m in EVAL_METRICS},
                "pooled": self.pooled, "rmse_ratio": self.ratios(),
                "confidence": self.confidence_json(), "literature": LITERATURE, "notes": self.notes}

    def confidence_json(self) -> dict[str, Any] | None:
        if not self.has_std() and self.reference_dir is None:
            return None
        return {"std_mean": self.mean_of("confidence", "std_mean"),
                "spearman_mean": self.mean_of("confidence", "spearman"),
                "spearman_pooled": self.spearman_pooled,
                "reference_rmse_mean": self.mean_of("reference", "rmse")}

    def format(self) -> str:
        """The one-screen tables and the closing line (stage2.evaluate.table)."""
        from .table import format_evaluation

        return format_evaluation(self)

    def verdict(self) -> str:
        """The closing line: the median and the worst per-tile RMSE ratio first, then the pooled and mean figures."""
        n = len(self.tiles)
        b, a = self.mean("before", "rmse"), self.mean("after", "rmse")
        if b is None or a is None:
            return "no tiles compared"
        r = self.ratios()
        pb, pa = self.pooled["before"]["rmse"], self.pooled["after"]["rmse"]
        if pb is None or pa is None:
            return "no pixels compared (no data everywhere)"
        if r["median"] is not None:
            head = (f"RMSE(opt_v2)/RMSE(opt_v1) per tile: median {r['median']:.3f}, worst {r['worst']:.3f} "
                    f"({r['worst_tile']}); {r['worse']} of {r['tiles']} tiles worse by more than "
                    f"{100 * WORSE_BY:.0f} %. ")
        else:
            head = "RMSE ratio undefined (every input equals its truth). "
        word = "closer to" if pa < pb else "NOT closer to"
        nb, na = self.mean("before", "ndvi_rmse"), self.mean("after", "ndvi_rmse")
        return (f"{head}Stage 2 output is {word} the truth: pooled RMSE {pb:.4f} -> {pa:.4f} ({_change(pb, pa)}), "
                f"mean RMSE {b:.4f} -> {a:.4f} ({_change(b, a)}), mean NDVI RMSE {_f(nb)} -> {_f(na)}; "
                f"RMSE improved on {self.improved('rmse')} of {n} tiles")


def _change(b: float, a: float) -> str:
    return f"{100 * (a - b) / b:+.1f} %" if b > 0 else "n/a"


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


class TileData(NamedTuple):
    """One tile's arrays as the scores read them: truth, opt_v1, opt_v2, the std (or None) and the output JSON."""

    truth: np.ndarray
    v1: np.ndarray
    v2: np.ndarray
    std: np.ndarray | None
    meta: dict[str, Any]


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


def _read_output(output_dir: Path, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The layers and JSON of `name` as stage2.read_output reads them: the NPZ, or the COG of an
    output_format=cog run (which holds opt_v2 only)."""
    try:
        got = read_output(output_dir / name)
    except TileError as e:
        raise RunError(f"output {output_dir / name} cannot be read: {e.reason} ({e.hint})") from None
    return got.layers, got.metadata


def read_tile(ev: Evaluation, name: str) -> TileData:
    """Tile `name` from `ev`'s folders, which must cover the same pixels."""
    truth = _read(Path(ev.truth_dir) / f"{name}.npz", TRUTH_KEYS, "truth")
    v1 = _read_input(Path(ev.input_dir), name)
    layers, meta = _read_output(Path(ev.output_dir), name)
    v2, std = layers[OUTPUT_KEY], layers.get(STD_KEY)
    if not truth.shape == v1.shape == v2.shape:
        raise RunError(f"tile {name}: shapes differ (truth {truth.shape}, input {v1.shape}, output "
                       f"{v2.shape}): the truth must cover the same pixels as the Stage 1 tile")
    return TileData(truth, v1, v2, None if std is None else np.asarray(std, np.float32), meta)


def tile_arrays(ev: Evaluation, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, opt_v1, opt_v2) of tile `name` from `ev`'s folders."""
    d = read_tile(ev, name)
    return d.truth, d.v1, d.v2


def _finished(output_dir: Path) -> list[str]:
    """Names with an output JSON and its data file (NPZ or COG), sorted."""
    files, _ = discover(output_dir, suffixes=(NPZ_SUFFIX, COG_SUFFIX))
    names = {tile_name(f, output_dir) for f in files}
    return sorted(n for n in names if (output_dir / json_key(n)).is_file())


def tta_of(meta: dict[str, Any]) -> str:
    """The output's test-time augmentation (processing.tta); "none" for runs that predate it."""
    proc = meta.get("processing")
    tta = proc.get("tta") if isinstance(proc, dict) else None
    return "none" if tta is None else str(tta)


def _one_label(values: set[str]) -> str | None:
    return None if not values else values.pop() if len(values) == 1 else "mixed: " + ", ".join(sorted(values))


class _Pool:
    """The running sums of the pooled figures."""

    def __init__(self) -> None:
        self.before, self.after, self.reference = Sums(), Sums(), Sums()
        self.ranks = RankSample()
        self.pixels = 0

    def result(self) -> dict[str, Any]:
        def part(s: Sums) -> dict[str, float | None]:
            r = s.rmse()
            return {"rmse": r, "psnr": None if r is None else psnr_of(r), "sam": s.sam_mean()}
        ref = self.reference.rmse()
        return {"pixels": self.pixels, "before": part(self.before), "after": part(self.after),
                "reference": None if ref is None else {"rmse": ref}}


def _reference(ev: Evaluation, name: str, d: TileData, pool: _Pool, ttas: set[str]) -> dict[str, float | None] | None:
    """RMSE against the truth of reference_dir's output of `name`, over the pixels scored for it."""
    try:
        got = read_output(Path(ev.reference_dir) / name)
    except TileError:
        ev.notes.append(f"reference_dir has no output of {name}")
        return None
    ref = got.layers[OUTPUT_KEY]
    if ref.shape != d.truth.shape:
        raise RunError(f"tile {name}: the reference output is {ref.shape}, the truth {d.truth.shape}: reference_dir "
                       "must hold a run over the same Stage 1 tiles")
    ttas.add(tta_of(got.metadata))
    valid = valid_pixels(d.truth, d.v1, d.v2, ref)
    r = rmse_over(d.truth, ref, valid)
    if r is not None:
        n = d.truth.shape[0] * (int(valid.sum()) if valid is not None else d.truth[0].size)
        pool.reference += Sums(sq_err=r * r * n, values=n)
    return {"rmse": r}


def _confidence(d: TileData, valid: np.ndarray | None, pool: _Pool) -> dict[str, Any]:
    """Does the std rank the real error? Spearman of per-pixel std and |opt_v2 - truth| (band means)."""
    s, e = pixel_spread(d.std, d.v2, d.truth, valid)
    sample_s, sample_e = pool.ranks.add(s, e)
    return {"std_mean": float(s.mean()) if s.size else None, "spearman": rank_correlation(sample_s, sample_e),
            "pixels": int(s.size), "ranked": int(sample_s.size)}


def evaluate_dirs(truth_dir: str | Path, input_dir: str | Path, output_dir: str | Path,
                  reference_dir: str | Path | None = None) -> Evaluation:
    """Score every finished output tile of `output_dir` (sorted by name) against its truth and input,
    and `reference_dir`'s output of the same tile when given."""
    folders = {"truth_dir": truth_dir, "input_dir": input_dir, "output_dir": output_dir, "reference_dir": reference_dir}
    paths = {k: None if v is None else Path(v) for k, v in folders.items()}
    for key, d in paths.items():
        if d is not None:
            require_dir(d, key, f"pass {key}=DIR")
    names = _finished(paths["output_dir"])
    if not names:
        raise RunError(f"No finished Stage 2 outputs in {output_dir}: run python -m stage2.predict first")
    ev = Evaluation(*(str(paths[k]) for k in ("truth_dir", "input_dir", "output_dir")),
                    reference_dir=None if reference_dir is None else str(paths["reference_dir"]))
    pool, ttas, ref_ttas = _Pool(), set(), set()
    for name in names:
        d = read_tile(ev, name)
        valid = valid_pixels(d.truth, d.v1, d.v2)
        before, sums_b = score(d.truth, d.v1, valid)
        after, sums_a = score(d.truth, d.v2, valid)
        pool.before += sums_b
        pool.after += sums_a
        t = TileScore(name, before, after, pixels=int(valid.sum()) if valid is not None else int(d.truth[0].size))
        pool.pixels += t.pixels
        ttas.add(tta_of(d.meta))
        if d.std is not None:
            t.confidence = _confidence(d, valid, pool)
        if ev.reference_dir is not None:
            t.reference = _reference(ev, name, d, pool, ref_ttas)
        ev.tiles.append(t)
    ev.tta, ev.reference_tta = _one_label(ttas), _one_label(ref_ttas)
    ev.pooled = pool.result()
    if ev.has_std():
        ev.spearman_pooled = {"spearman": pool.ranks.spearman(), "pixels": pool.ranks.pixels,
                              "ranked": int(pool.ranks.pairs.shape[1]), "max_pixels": SPEARMAN_MAX_PIXELS,
                              "seed": SPEARMAN_SEED}
    return ev
