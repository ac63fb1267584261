"""Run-level checks of settings and paths, made before anything is read or written (SPEC 5, exit 2).

No torch, terratorch or rasterio: a run that is refused, and the "nothing to do" path, stay light.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from ..conditioning import POLICIES as CONDITIONING_POLICIES
from ..formats.cog import CogSettings
from ..product import OUTPUT_FORMATS
from ..runtime import RunError, check_precision, require_dir
from ..store import is_url, safe_url
from ..tiles import NAN_POLICIES
from .confidence import TTA_MODES
from .windows import WindowSettings


def check_settings(cfg: DictConfig) -> None:
    """batch_size >= 1, num_workers >= 0, known precision, output format, nan_policy and tta, valid window:
    else RunError."""
    _at_least(cfg, "batch_size", 1, "the number of tiles per forward pass")
    _at_least(cfg, "num_workers", 0, "DataLoader worker processes; 0 reads tiles in the main process")
    check_precision(cfg.precision)
    check_output_format(cfg)
    if cfg.get("unseen_conditioning", "unknown") not in CONDITIONING_POLICIES:
        raise RunError(f"unseen_conditioning={cfg.unseen_conditioning!r} is not one of "
                       f"{', '.join(CONDITIONING_POLICIES)}: pass unseen_conditioning=unknown (a month or biome the "
                       "checkpoint never trained on becomes its learned unknown) or unseen_conditioning=as_is")
    if cfg.nan_policy not in NAN_POLICIES:
        raise RunError(f"nan_policy={cfg.nan_policy!r} is not one of {', '.join(NAN_POLICIES)}: pass "
                       "nan_policy=fail (NaN fails the tile) or nan_policy=mask (NaN pixels are no data)")
    _settings(WindowSettings, cfg.window, "window")
    if cfg.tta not in TTA_MODES:
        raise RunError(f"tta={cfg.tta!r} is not one of {', '.join(TTA_MODES)}: pass tta=none (one pass), "
                       "tta=flips (4 passes: the tile and its flips) or tta=d4 (8 passes: flips and 90-degree "
                       "rotations); see docs/confidence.md")


def check_output_format(cfg: DictConfig) -> None:
    """`output_format` is npz, cog or both, and the `cog:` settings are valid (SPEC 10)."""
    if cfg.output_format not in OUTPUT_FORMATS:
        raise RunError(f"output_format={cfg.output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}: pass "
                       "output_format=npz, output_format=cog (Cloud Optimized GeoTIFF) or output_format=both")
    _settings(CogSettings, cfg.cog, "cog")


def _settings(kind: type, values: DictConfig, section: str) -> None:
    """Build the settings object of a conf/predict.yaml section once, turning its complaint into a RunError."""
    try:
        kind(**values)
    except (TypeError, ValueError) as e:
        raise RunError(f"{e} (the defaults are in conf/predict.yaml, under {section}:)") from None


def _at_least(cfg: DictConfig, key: str, low: int, what: str) -> None:
    value = cfg.get(key)
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < low:
        raise RunError(f"{key}={value} is not valid: use an integer >= {low} ({what})")


def check_output_dir(input_dir: Path, output_dir: Path) -> None:
    """output_dir is a writable folder (or can be made), and not the input folder by any path.

    "By any path" means by device and inode (os.path.samefile): a symlink, a bind mount or a
    case-insensitive file system all reach the same folder under another name, and writing
    there would overwrite the Stage 1 inputs (with skip_existing=false) or mix them with outputs.
    """
    if output_dir.is_dir() and os.path.samefile(output_dir, input_dir):
        raise RunError(f"output_dir {output_dir} is the input_dir {input_dir} (the same folder by another path): "
                       "write Stage 2 outputs to another folder")
    check_writable_folder(output_dir)


def check_writable_folder(output_dir: Path) -> None:
    """output_dir is a folder that can be written, or can be made where it is."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunError(f"output_dir {output_dir} is not a directory: point output_dir at a folder "
                       "(it is created if missing)")
    existing = _nearest_existing(output_dir)
    if not existing.is_dir():
        raise RunError(f"output_dir {output_dir} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is read-only" if existing == output_dir.absolute() else f"cannot be created in read-only {existing}"
        raise RunError(f"output_dir {output_dir} {what}: choose a folder you can write to, "
                       "or fix its permissions (or the mount)")


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path



def check_locations(input_dir: Path | str, output_dir: Path | str) -> None:
    """A local input_dir is a folder, a local output_dir can be written and is not input_dir by any
    path, a bucket prefix is not both."""
    if not is_url(input_dir):
        require_dir(Path(input_dir), "input_dir", "point input_dir at the folder of Stage 1 tiles")
    if is_url(output_dir):
        if safe_url(str(input_dir)).rstrip("/") == safe_url(str(output_dir)).rstrip("/"):
            raise RunError(f"output_dir {safe_url(str(output_dir))} is the input_dir: write Stage 2 outputs to "
                           "another prefix")
    elif is_url(input_dir):
        check_writable_folder(Path(output_dir))
    else:
        check_output_dir(Path(input_dir), Path(output_dir))
