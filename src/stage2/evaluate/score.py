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

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..formats import geotiff
from ..product import COG_SUFFIX, NPZ_SUFFIX, OUTPUT_KEY, STD_KEY, json_key, read_output
from ..runtime import RunError, require_dir
from ..tiles import INPUT_KEY, TileError, discover, tile_name
from .evaluation import Evaluation, TileScore
from .metrics import (
    SPEARMAN_MAX_PIXELS,
    SPEARMAN_SEED,
    RankSample,
    Sums,
    pixel_spread,
    psnr_of,
    rmse_over,
    score,
    valid_pixels,
)
from .metrics import spearman as rank_correlation

TRUTH_KEYS = ("target", INPUT_KEY)      # a pairs file's truth, or a folder of optical tiles
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
    """RMSE against the truth of reference_dir's output of `name`, over the pixels scored for the tile
    (less any the reference has no data on); a missing reference output is a note, not an error."""
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
