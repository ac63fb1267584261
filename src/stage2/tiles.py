"""Stage 1 input: read and validate one NPZ tile and its JSON sidecar (docs/input.md, docs/usage.md#errors).

Pure numpy and the standard library, no torch: the "nothing to do" fast path, the DataLoader
workers and the report all use it without paying for a deep-learning import.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .nodata import block_rows, fill_nearest, nodata_mask, row_blocks
from .store.base import RESERVED_PREFIX

INPUT_KEY = "opt_v1"
N_BANDS = 4
BANDS = ("B02", "B03", "B04", "B08")
MIN_SIDE = 16
DEFAULT_MONTH = 6
DEFAULT_BIOME = 0
CLIP_TOLERANCE = 0.01
NAN_POLICIES = ("fail", "mask")     # docs/large-tiles.md: NaN fails the tile, or marks no-data pixels

_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december"]
_MONTH_NAMES = {name: i + 1 for i, name in enumerate(_MONTHS)} | {
    name[:3]: i + 1 for i, name in enumerate(_MONTHS)} | {"sept": 9}

SCALING_HINT = ("it looks like digital numbers or reflectance x 10000: divide by 10000 "
                "(and subtract the 1000 offset for processing baseline 04.00 and later) "
                "so values lie in [0, 1]")
DN_HINT = ("run with input_scale=0.0001 (Sentinel-2 L1C/L2A), and input_offset=-0.1 for processing baseline "
           "04.00 and later, so that reflectance = DN x input_scale + input_offset; "
           "or divide by 10000 in Stage 1")


class TileError(Exception):
    """A problem with one tile: the tile fails with `reason` and `hint`, the run goes on."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


@dataclass(frozen=True)
class GeoRef:
    """Where a tile's pixels lie on Earth: carried from a GeoTIFF (or an NPZ sidecar) to a COG output."""

    crs: str                                  # "EPSG:32633" when the CRS has an EPSG code, else its WKT
    transform: tuple[float, float, float, float, float, float]   # a, b, c, d, e, f as rasterio orders them


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
    geo: GeoRef | None = None      # from a GeoTIFF, or a sidecar's crs + transform; None: not georeferenced
    source: dict[str, Any] = field(default_factory=dict)  # input_state() when it was read (rerun trust)
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


def discover(input_dir: Path, recursive: bool = False, exclude: Path | None = None,
             suffixes: tuple[str, ...] = (".npz",)) -> tuple[list[Path], list[Path]]:
    """Sorted tile files in input_dir (names ending in `suffixes`, any letter case; predict passes
    formats.INPUT_SUFFIXES), and the entries so named that are not files (ignored).

    With `recursive`, sub-folders are followed also when they are symbolic links (each real folder
    once, so a link loop ends); hidden files and folders are skipped, and so is `exclude` (the
    output folder, when it lies inside input_dir: its outputs are not inputs).
    """
    skip = _dir_id(exclude) if exclude is not None else None
    files, ignored, seen = [], [], set()
    for folder, subdirs, names in os.walk(input_dir, followlinks=True):
        here = _dir_id(Path(folder))
        if here in seen or (skip is not None and here == skip):
            subdirs[:] = []
            continue
        seen.add(here)
        visible = sorted(d for d in subdirs if not d.startswith("."))
        subdirs[:] = visible if recursive else []
        for name in names + [d for d in visible if d.lower().endswith(suffixes)]:
            if name.lower().endswith(suffixes) and not name.startswith("."):
                p = Path(folder) / name
                (files if p.is_file() else ignored).append(p)
    return sorted(files), sorted(ignored)


def _dir_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder: the same folder by any path (links, bind mounts, letter case)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def is_reserved(name: str) -> bool:
    """Whether a tile's output name would collide with the run's own `_stage2_*` files."""
    return Path(name).name.startswith(RESERVED_PREFIX)


def input_state(path: Path) -> dict[str, Any]:
    """What a rerun compares to decide the input has not changed: size and mtime of the NPZ and sidecar."""
    st = path.stat()
    side = sidecar_path(path)
    side_st = side.stat() if side is not None else None
    return {"input_size": st.st_size, "input_mtime": st.st_mtime,
            "sidecar_size": side_st.st_size if side_st else None,
            "sidecar_mtime": side_st.st_mtime if side_st else None}


# --------------------------------------------------------------------------- metadata

def normalise_month(value: Any) -> int:
    """1-12 from an int, an integral float, "6", "6.0", or a month name/abbreviation in any case."""
    given = value
    if isinstance(value, bool):
        raise ValueError(f"month must be 1-12 or a month name, got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower().rstrip(".")
        if text in _MONTH_NAMES:
            return _MONTH_NAMES[text]
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"month {given!r} is not a number 1-12 or a month name") from None
    if isinstance(value, (int, float)) and math.isfinite(value) and float(value).is_integer():
        month = int(value)
        if 1 <= month <= 12:
            return month
        raise ValueError(f"month {given!r} is out of range 1-12")      # the user's "13", not 13.0
    raise ValueError(f"month {given!r} is not a number 1-12 or a month name")


def normalise_biome(value: Any) -> int:
    """0-15 from an int, an integral float or its string form."""
    given = value
    if isinstance(value, bool):
        raise ValueError(f"biome_code must be an integer 0-15, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"biome_code {given!r} is not an integer 0-15") from None
    if isinstance(value, (int, float)) and math.isfinite(value) and float(value).is_integer():
        biome = int(value)
        if 0 <= biome <= 15:
            return biome
        raise ValueError(f"biome_code {given!r} is out of range 0-15")
    raise ValueError(f"biome_code {given!r} is not an integer 0-15")


def sidecar_path(npz_path: Path) -> Path | None:
    """`<stem>.json` beside the NPZ as named in input_dir, else beside the file a symlink points to.

    The one beside the link wins: it is where the user put it for this input_dir. A link alone
    (`ln -s /stage1/x.npz`) still finds the sidecar Stage 1 wrote beside its real file.
    """
    beside = npz_path.with_suffix(".json")
    if beside.is_file():
        return beside
    real = npz_path.resolve().with_suffix(".json")
    return real if real != beside and real.is_file() else None


def _no_default(value: Any) -> bool:
    """null, or a blank string: the key falls back to its default (docs/input.md)."""
    return value is None or (isinstance(value, str) and not value.strip())


def read_sidecar(npz_path: Path) -> tuple[dict[str, Any], int, int, list[str]]:
    """The sidecar's metadata with month/biome normalised, and which keys fell back to defaults.

    A UTF-8 byte-order mark is accepted; NaN and Infinity (not strict JSON) become null.
    """
    js = sidecar_path(npz_path) or npz_path.with_suffix(".json")
    meta: dict[str, Any] = {}
    if js.is_file():
        try:
            meta = json.loads(js.read_text(encoding="utf-8-sig"), parse_constant=lambda _: None)
        except UnicodeDecodeError as e:
            raise TileError(f"sidecar {js.name} is not UTF-8 text ({e.reason})",
                            "write the sidecar as UTF-8 JSON") from None
        except OSError as e:
            raise TileError(f"cannot read the sidecar {js.name}: {e.strerror}",
                            "check the sidecar's permissions") from None
        except json.JSONDecodeError as e:
            raise TileError(f"sidecar {js.name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                            "fix the JSON syntax or delete the sidecar to use month 6, biome 0") from None
        if not isinstance(meta, dict):
            raise TileError(f"sidecar {js.name} holds a JSON {type(meta).__name__}, not an object",
                            'write a JSON object such as {"month": 6, "biome_code": 4}')
    defaults: list[str] = []
    try:
        if _no_default(meta.get("month")):
            month = DEFAULT_MONTH
            defaults.append("month")
        else:
            month = normalise_month(meta["month"])
        if _no_default(meta.get("biome_code")):
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

def peek_shape(path: Path, key: str = INPUT_KEY) -> tuple[int, ...] | None:
    """The shape of array `key` from the .npy header inside the zip, without reading the data.

    Used to bucket tiles by padded size before loading them, and to check an output is complete
    (its zip directory is at the end of the file). None when the header cannot be read; the full
    read then reports the exact problem.
    """
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            size = struct.unpack("<H" if major == 1 else "<I", f.read(2 if major == 1 else 4))[0]
            return _header_shape(f.read(size).decode("latin1"))
    except Exception:
        return None


_SHAPE = re.compile(r"'shape':\s*\(([\d\s,]*)\)")


def _header_shape(header: str) -> tuple[int, ...] | None:
    """`shape` of an .npy header dict. A regular expression, not numpy's literal_eval: a rerun checks
    two headers per tile, and the whole check took 0.51 ms per tile with literal_eval, 0.28-0.34 ms
    without it (3000 tiles, benchmarks/bench_rerun.py)."""
    m = _SHAPE.search(header)
    return tuple(int(x) for x in m.group(1).split(",") if x.strip()) if m else None


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


def to_reflectance(arr: np.ndarray, input_scale: float | None, input_offset: float | None) -> np.ndarray:
    """Integer digital numbers -> float32 reflectance, DN x input_scale + input_offset (docs/input.md).

    The one scaling of every reader (NPZ, GeoTIFF, a GeoTIFF window). Float arrays are reflectance
    already and pass unchanged; an integer array without `input_scale` fails with a hint naming the
    keys. Computed in float32: DN up to 65535 times 1e-4 is exact to 4e-7, far below the 1e-4 step.
    """
    if arr.dtype.kind not in "iu":
        return arr
    if input_scale is None:
        raise TileError(f"integer array ({arr.dtype}) of digital numbers, and input_scale is not set", DN_HINT)
    out = arr.astype(np.float32)
    out *= np.float32(input_scale)
    if input_offset:
        out += np.float32(input_offset)
    return out


def georef_from_sidecar(meta: dict[str, Any], sidecar: str) -> GeoRef | None:
    """The sidecar's `crs` (EPSG code or WKT) and `transform` (6 numbers), or None when it has not both.

    Only their form is checked here (the NPZ path needs no rasterio); whether the CRS exists is
    checked where a COG is written.
    """
    crs, transform = meta.get("crs"), meta.get("transform")
    if crs is None or transform is None:
        return None
    if isinstance(crs, bool) or not isinstance(crs, (int, str)) or not str(crs).strip():
        raise TileError(f"sidecar {sidecar}: crs {crs!r} is not an EPSG code or WKT text",
                        'write "crs": "EPSG:32633" (or the CRS\'s WKT), or remove crs and transform')
    if isinstance(crs, int) or str(crs).strip().isdigit():
        crs = f"EPSG:{int(crs)}"
    numbers = list(transform) if isinstance(transform, (list, tuple)) else []
    if len(numbers) == 9 and numbers[6:] == [0, 0, 1]:     # list(Affine) gives the 3x3 matrix's 9 numbers
        numbers = numbers[:6]
    if len(numbers) != 6 or not all(_finite_number(v) for v in numbers):
        raise TileError(f"sidecar {sidecar}: transform {transform!r} is not the 6 numbers a, b, c, d, e, f",
                        'write "transform": [10, 0, 500000, 0, -10, 5000000] (rasterio\'s Affine order: '
                        "pixel width, row rotation, x of the top-left corner, column rotation, "
                        "negative pixel height, y of the top-left corner)")
    return GeoRef(crs=str(crs).strip(), transform=tuple(float(v) for v in numbers))


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_array(arr: np.ndarray, allow_nan: bool = False) -> tuple[np.ndarray, int]:
    """Check an opt_v1 array (docs/input.md, docs/usage.md#errors); return it as float32 in [0, 1] and the
    clipped count.

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
        b_lo, b_hi = float(block.min()), float(block.max())     # NaN and Inf show here
        if math.isfinite(b_lo) and math.isfinite(b_hi):         # the common case: two passes, not four
            lo, hi = min(lo, b_lo), max(hi, b_hi)
            continue
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


def open_input(path: str | os.PathLike, input_dir: str | os.PathLike | None,
               nan_policy: str) -> tuple[Path, str, dict[str, Any]]:
    """What every reader checks first: (path, output name, input_state taken before reading)."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy={nan_policy!r}: use one of {list(NAN_POLICIES)}")
    path = Path(path)
    name = tile_name(path, Path(input_dir)) if input_dir is not None else path.stem
    if not path.is_file():
        raise TileError("not a regular file", "remove it or point input_dir at the tiles")
    return path, name, input_state(path)   # before reading: a change while it is read shows on the next run


def read_tile(path: str | os.PathLike, input_dir: str | os.PathLike | None = None, *, nan_policy: str = "fail",
              input_scale: float | None = None, input_offset: float | None = None) -> Tile:
    """Read and validate one Stage 1 NPZ tile and its sidecar; raise TileError with reason and hint.

    nan_policy="mask" (docs/large-tiles.md): NaN pixels are allowed; `Tile.nodata` marks them and `Tile.array`
    holds them filled from their nearest valid pixel (stage2.nodata), ready for the model.
    `input_scale`/`input_offset` scale an integer array (to_reflectance); float tiles ignore them.
    """
    path, name, source = open_input(path, input_dir, nan_policy)
    arr = to_reflectance(_load_array(path), input_scale, input_offset)
    arr, clipped = validate_array(arr, allow_nan=nan_policy == "mask")
    meta, month, biome, defaults = read_sidecar(path)
    geo = georef_from_sidecar(meta, path.with_suffix(".json").name)
    tile = Tile(name=name, path=path, array=arr, meta=meta, month=month, biome=biome,
                defaults=defaults, clipped=clipped, geo=geo, source=source)
    return apply_nan_policy(tile, nan_policy)


def apply_nan_policy(tile: Tile, nan_policy: str) -> Tile:
    """Under nan_policy=mask, mark the tile's NaN pixels (Tile.nodata) and fill them from their nearest
    valid pixel for the model; a tile with no valid pixel fails. Shared by the NPZ and GeoTIFF readers."""
    if nan_policy != "mask":
        return tile
    mask = nodata_mask(tile.array)
    tile.masked = int(np.count_nonzero(mask))
    if tile.masked == mask.size:
        raise TileError(f"no valid pixel: all {mask.size} pixels are NaN (no data) in at least one band",
                        "nothing to refine here: leave this tile out of input_dir")
    if tile.masked:
        fill_nearest(tile.array, mask)
        tile.nodata = mask
    return tile
