"""Read, validate and write one tile and its JSON sidecar (SPEC 2, 3, 5).

Pure numpy and the standard library, no torch: the "nothing to do" fast path, the DataLoader
workers and the report all use it without paying for a deep-learning import.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .nodata import block_rows, fill_nearest, nodata_mask, row_blocks
from .runtime import TMP_SUFFIX, atomic_write, atomic_write_text

INPUT_KEY = "opt_v1"
OUTPUT_KEY = "opt_v2"
N_BANDS = 4
BANDS = ("B02", "B03", "B04", "B08")
MIN_SIDE = 16
DEFAULT_MONTH = 6
DEFAULT_BIOME = 0
CLIP_TOLERANCE = 0.01
NAN_POLICIES = ("fail", "mask")     # SPEC 9: NaN fails the tile, or marks no-data pixels
# The run's own files in output_dir (never outputs: their names start with "_stage2_").
SUMMARY_FILE = "_stage2_summary.json"
FAILURES_FILE = "_stage2_failures.jsonl"

_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december"]
_MONTH_NAMES = {name: i + 1 for i, name in enumerate(_MONTHS)} | {
    name[:3]: i + 1 for i, name in enumerate(_MONTHS)} | {"sept": 9}

SCALING_HINT = ("it looks like digital numbers or reflectance x 10000: divide by 10000 "
                "(and subtract the 1000 offset for processing baseline 04.00 and later) "
                "so values lie in [0, 1]")


class TileError(Exception):
    """A problem with one tile: the tile fails with `reason` and `hint`, the run goes on."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


@dataclass
class Tile:
    """One validated input tile, ready for the model."""

    name: str                      # output name: the input's path relative to input_dir, without .npz
    path: Path
    array: np.ndarray              # float32 (4, H, W), in [0, 1]
    meta: dict[str, Any]           # the sidecar, month/biome_code normalised to int
    month: int
    biome: int
    defaults: list[str] = field(default_factory=list)   # metadata keys that fell back to a default
    clipped: int = 0               # values within CLIP_TOLERANCE outside [0, 1] that were clipped
    nodata: np.ndarray | None = None   # (H, W) bool under nan_policy=mask: True where the input is NaN
    masked: int = 0                # no-data pixels (filled for the model, NaN in opt_v2)


@dataclass
class TileFailure:
    """A tile that could not be read: travels the same road as a Tile, so the writer logs it."""

    name: str
    path: Path
    reason: str
    hint: str


# --------------------------------------------------------------------------- discovery

def tile_name(path: Path, input_dir: Path) -> str:
    """Output name from the input path only (never from metadata): relative path minus `.npz`."""
    return path.relative_to(input_dir).with_suffix("").as_posix()


def discover(input_dir: Path, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """Sorted NPZ files in input_dir, and the entries named *.npz that are not files (ignored)."""
    pattern = "**/*.npz" if recursive else "*.npz"
    files, ignored = [], []
    for p in sorted(input_dir.glob(pattern)):
        if p.name.startswith("."):
            continue
        (files if p.is_file() else ignored).append(p)
    return files, ignored


def output_paths(output_dir: Path, name: str) -> tuple[Path, Path]:
    return output_dir / f"{name}.npz", output_dir / f"{name}.json"


def is_done(output_dir: Path, name: str) -> bool:
    """A tile is done only when its JSON (written last) and its NPZ both exist."""
    npz, js = output_paths(output_dir, name)
    return js.is_file() and npz.is_file()


def remove_stale_temporaries(output_dir: Path) -> int:
    """Delete `.<name>.*.tmp` files a killed run left behind; return how many."""
    n = 0
    if output_dir.is_dir():
        for p in output_dir.rglob(f".*{TMP_SUFFIX}"):
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


# --------------------------------------------------------------------------- metadata

def normalise_month(value: Any) -> int:
    """1-12 from an int, an integral float, "6", "6.0", or a month name/abbreviation in any case."""
    if isinstance(value, bool):
        raise ValueError(f"month must be 1-12 or a month name, got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower().rstrip(".")
        if text in _MONTH_NAMES:
            return _MONTH_NAMES[text]
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"month {value!r} is not a number 1-12 or a month name") from None
    if isinstance(value, (int, float)) and math.isfinite(value) and float(value).is_integer():
        month = int(value)
        if 1 <= month <= 12:
            return month
        raise ValueError(f"month {value!r} is out of range 1-12")
    raise ValueError(f"month {value!r} is not a number 1-12 or a month name")


def normalise_biome(value: Any) -> int:
    """0-15 from an int, an integral float or its string form."""
    if isinstance(value, bool):
        raise ValueError(f"biome_code must be an integer 0-15, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"biome_code {value!r} is not an integer 0-15") from None
    if isinstance(value, (int, float)) and math.isfinite(value) and float(value).is_integer():
        biome = int(value)
        if 0 <= biome <= 15:
            return biome
        raise ValueError(f"biome_code {value!r} is out of range 0-15")
    raise ValueError(f"biome_code {value!r} is not an integer 0-15")


def read_sidecar(npz_path: Path) -> tuple[dict[str, Any], int, int, list[str]]:
    """The sidecar's metadata with month/biome normalised, and which keys fell back to defaults."""
    js = npz_path.with_suffix(".json")
    meta: dict[str, Any] = {}
    if js.is_file():
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise TileError(f"sidecar {js.name} is not UTF-8 text ({e.reason})",
                            "write the sidecar as UTF-8 JSON") from None
        except json.JSONDecodeError as e:
            raise TileError(f"sidecar {js.name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                            "fix the JSON syntax or delete the sidecar to use month 6, biome 0") from None
        if not isinstance(meta, dict):
            raise TileError(f"sidecar {js.name} holds a JSON {type(meta).__name__}, not an object",
                            'write a JSON object such as {"month": 6, "biome_code": 4}')
    defaults: list[str] = []
    try:
        if meta.get("month") is None:
            month = DEFAULT_MONTH
            defaults.append("month")
        else:
            month = normalise_month(meta["month"])
        if meta.get("biome_code") is None:
            biome = DEFAULT_BIOME
            defaults.append("biome_code")
        else:
            biome = normalise_biome(meta["biome_code"])
    except ValueError as e:
        raise TileError(f"sidecar {js.name}: {e}",
                        "use month 1-12 (or a name such as 'jun') and biome_code 0-15, "
                        "or null for the default") from None
    # The values the model used, also where they were defaulted (listed in metadata_defaults).
    meta = {**meta, "month": month, "biome_code": biome}
    return meta, month, biome, defaults


# --------------------------------------------------------------------------- arrays

def peek_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of `opt_v1` from the .npy header inside the zip, without reading the data.

    Used to bucket tiles by padded size before loading them. None when the header cannot be
    read; the full read then reports the exact problem.
    """
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{INPUT_KEY}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(f)
            return tuple(int(s) for s in shape)
    except Exception:
        return None


def _load_array(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        raise TileError("empty file (0 bytes)", "Stage 1 did not finish this tile: regenerate it")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise TileError(f"cannot read the file: {e.strerror}", "check the file's permissions") from None
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            raise TileError("truncated or damaged NPZ (the zip directory is missing)",
                            "the file was cut short, e.g. by a full disk or a killed Stage 1 job: regenerate it")
        if head.startswith(b"\x93NUMPY"):
            raise TileError("a single .npy array saved under a .npz name",
                            f"save tiles with numpy.savez(path, {INPUT_KEY}=array)")
        raise TileError("not an NPZ file (not a zip archive)",
                        f"save tiles with numpy.savez(path, {INPUT_KEY}=array)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            if INPUT_KEY not in keys:
                raise TileError(f"no '{INPUT_KEY}' array in the NPZ (found keys: {keys})",
                                f"save the Stage 1 output under the key '{INPUT_KEY}'")
            return npz[INPUT_KEY]
    except TileError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise TileError(f"'{INPUT_KEY}' is an object (pickled) array; it was not loaded",
                            "store a plain float32 array: pickled arrays can run code and are never loaded") from None
        raise TileError(f"unreadable NPZ: {e}", "regenerate the tile") from None
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, KeyError) as e:
        raise TileError(f"unreadable or truncated NPZ: {type(e).__name__}: {e}",
                        "the file is damaged or was cut short: regenerate it") from None


def validate_array(arr: np.ndarray, allow_nan: bool = False) -> tuple[np.ndarray, int]:
    """Check an opt_v1 array against SPEC 2/5; return it as float32 in [0, 1] and the clipped count.

    Values within CLIP_TOLERANCE outside [0, 1] are clipped in place (the array read from the file
    is not kept elsewhere, and a copy would double a large tile's memory). With `allow_nan`
    (nan_policy=mask) NaN passes (read_tile then fails a tile with no valid pixel); Inf never does.
    """
    if arr.dtype.kind in "iu":
        raise TileError(f"integer array ({arr.dtype}): values look like digital numbers, not reflectance",
                        SCALING_HINT)
    if arr.dtype.kind != "f":
        raise TileError(f"unsupported dtype {arr.dtype}", "store float32 reflectance in [0, 1]")
    if arr.ndim != 3:
        raise TileError(f"wrong rank: shape {arr.shape} has {arr.ndim} dimensions, expected 3 (4, H, W)",
                        "store one tile as (bands, height, width)")
    if arr.shape[0] != N_BANDS:
        if arr.shape[-1] == N_BANDS:
            raise TileError(f"channels-last array {arr.shape}: the 4 bands are on the last axis",
                            "transpose to channels-first with array.transpose(2, 0, 1)")
        raise TileError(f"wrong channel count: shape {arr.shape} has {arr.shape[0]} channels, expected 4 "
                        f"{list(BANDS)}", "keep only bands B02, B03, B04, B08 in that order")
    h, w = arr.shape[1:]
    if h == 0 or w == 0:
        raise TileError(f"empty array {arr.shape}", "Stage 1 wrote no pixels: regenerate the tile")
    if h < MIN_SIDE or w < MIN_SIDE:
        raise TileError(f"tile {h}x{w} is smaller than {MIN_SIDE} px on a side (one model patch)",
                        f"merge it with its neighbours or drop it: tiles need at least {MIN_SIDE}x{MIN_SIDE} px")
    n_nan, n_inf, lo, hi = _value_stats(arr)
    _check_non_finite(n_nan, n_inf, allow_nan)
    if lo < -CLIP_TOLERANCE or hi > 1 + CLIP_TOLERANCE:
        raise TileError(f"values in [{lo:.4g}, {hi:.4g}], far outside [0, 1]", SCALING_HINT)
    arr = arr.astype(np.float32, copy=False)
    clipped = 0
    if lo < 0 or hi > 1:
        arr = arr if arr.flags.writeable else arr.copy()
        clipped = _clip_in_place(arr)
    return np.ascontiguousarray(arr), clipped


def _value_stats(arr: np.ndarray) -> tuple[int, int, float, float]:
    """NaN count, Inf count, and min and max of the other values, by row blocks (no tile-sized temporaries)."""
    n_nan = n_inf = 0
    lo, hi = np.inf, -np.inf
    step = block_rows(arr)
    for r in row_blocks(arr):
        block = arr[:, r:r + step]
        finite = np.isfinite(block)
        if not finite.all():
            nan = int(np.count_nonzero(np.isnan(block)))
            n_nan, n_inf = n_nan + nan, n_inf + block.size - int(np.count_nonzero(finite)) - nan
        # fmin/fmax skip NaN; a block of NaN only gives NaN, which min/max below ignore
        lo, hi = min(lo, float(np.fmin.reduce(block, axis=None))), max(hi, float(np.fmax.reduce(block, axis=None)))
    return n_nan, n_inf, lo, hi


def _check_non_finite(n_nan: int, n_inf: int, allow_nan: bool) -> None:
    if (n_nan or n_inf) and not allow_nan:
        raise TileError(f"{n_nan} NaN and {n_inf} Inf values",
                        "fill no-data pixels in Stage 1 (e.g. with numpy.nan_to_num), or run with "
                        "nan_policy=mask to refine the valid pixels and keep NaN as no data")
    if n_inf:
        raise TileError(f"{n_inf} Inf values (nan_policy=mask masks NaN only)",
                        "write no-data pixels as NaN in Stage 1; Inf is not a reflectance")


def _clip_in_place(arr: np.ndarray) -> int:
    """Clip to [0, 1] in place, by row blocks; return how many values were outside."""
    clipped = 0
    step = block_rows(arr)
    for r in row_blocks(arr):
        block = arr[:, r:r + step]
        clipped += int(np.count_nonzero((block < 0) | (block > 1)))
        np.clip(block, 0.0, 1.0, out=block)
    return clipped


def read_tile(path: str | os.PathLike, input_dir: str | os.PathLike | None = None, *,
              nan_policy: str = "fail") -> Tile:
    """Read and validate one Stage 1 tile and its sidecar; raise TileError with reason and hint.

    nan_policy="mask" (SPEC 9): NaN pixels are allowed; `Tile.nodata` marks them and `Tile.array`
    holds them filled from their nearest valid pixel (stage2.nodata), ready for the model.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy={nan_policy!r}: use one of {list(NAN_POLICIES)}")
    path = Path(path)
    name = tile_name(path, Path(input_dir)) if input_dir is not None else path.stem
    if not path.is_file():
        raise TileError("not a regular file", "remove it or point input_dir at the tiles")
    arr, clipped = validate_array(_load_array(path), allow_nan=nan_policy == "mask")
    meta, month, biome, defaults = read_sidecar(path)
    tile = Tile(name=name, path=path, array=arr, meta=meta, month=month, biome=biome,
                defaults=defaults, clipped=clipped)
    if nan_policy == "mask":
        mask = nodata_mask(arr)
        tile.masked = int(np.count_nonzero(mask))
        if tile.masked == mask.size:
            raise TileError(f"no valid pixel: all {mask.size} pixels are NaN (no data) in at least one band",
                            "nothing to refine here: leave this tile out of input_dir")
        if tile.masked:
            fill_nearest(arr, mask)
            tile.nodata = mask
    return tile


def load_tile(path: Path, input_dir: Path, *, nan_policy: str) -> Tile | TileFailure:
    """read_tile that never raises: a bad tile becomes a TileFailure."""
    try:
        return read_tile(path, input_dir, nan_policy=nan_policy)
    except TileError as e:
        return TileFailure(tile_name(path, input_dir), path, e.reason, e.hint)
    except Exception as e:  # anything unexpected still must not stop the run
        return TileFailure(tile_name(path, input_dir), path, f"unexpected error: {type(e).__name__}: {e}",
                           "report this tile to the stage2 maintainers")


# --------------------------------------------------------------------------- writing

def write_tile(output_dir: str | os.PathLike, name: str, opt_v2: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write `<name>.npz` (key opt_v2) then `<name>.json`, each atomically; return the JSON path.

    The JSON is written last, so a tile whose JSON exists is complete (SPEC 3).
    """
    npz_path, json_path = output_paths(Path(output_dir), name)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.ascontiguousarray(opt_v2, dtype=np.float32)
    atomic_write(npz_path, lambda f: np.savez(f, **{OUTPUT_KEY: arr}))
    atomic_write_text(json_path, json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return json_path


def read_output(path: str | os.PathLike) -> np.ndarray:
    """The opt_v2 array of an output NPZ (never unpickles)."""
    with np.load(path, allow_pickle=False) as npz:
        return npz[OUTPUT_KEY]
