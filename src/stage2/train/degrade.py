"""A seeded imitation of a SAR-to-optical translator's errors, to make training pairs from real optical.

Real (Stage 1 output, true optical) pairs are the best training data, but a user often has optical
tiles and no Stage 1 model yet. This module turns a true optical tile into a plausible Stage 1
output, so the refiner can learn to undo the kind of errors a translator makes:

1. misregistration: a sub-pixel shift of the whole tile, uniform in [-max_shift, max_shift] px
   per axis (SAR and optical geometries never line up exactly);
2. blur: a Gaussian of sigma uniform in `blur_sigma` px (translators lose fine detail);
3. regression to the mean: each band pulled towards a typical reflectance `anchor`,
   y = anchor + c * (x - anchor) with c uniform in `contrast` per tile (networks trained with
   pixel losses wash out contrast) - the systematic part of the colour error;
4. per-band gain and offset drift: gain 1 + N(0, gain_sd), offset N(0, offset_sd), per band and
   tile - the random part of the colour error;
5. speckle leaking from the SAR input: multiplicative, mean 1, standard deviation uniform in
   `speckle_sd` (gamma distributed, as SAR speckle is);
6. sensor-like noise: additive Gaussian, standard deviation uniform in `noise_sd`;
then clipped to [0, 1] and stored as float32.

Every draw comes from one numpy Generator, so a (tile, seed) pair always gives the same result;
`degrade_dir` seeds each tile from (seed, tile name), so a tile's result does not depend on which
other tiles are in the folder. Pure numpy and scipy: it runs inside DataLoader workers.

A second recipe, the broad family of stage2.train.family (conf/degradation/family.yaml: every
sample draws its own kinds and strengths of error, and a share stays clean), is chosen by the
config's `recipe` key; `load_params` reads either, and `degrade` runs either.

`python -m stage2.degrade truth_dir=DIR output_dir=DIR seed=N` writes opt_v1 tiles + sidecars
(conf/degrade.yaml; the ranges are the `degrade` node, e.g. `degrade.noise_sd=[0.01,0.03]`, and
`degradation@degrade=family degrade.only=[haze]` degrades with one kind of the family).
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from .. import CONF_DIR
from ..runtime import RunError, atomic_write, atomic_write_text, guarded, hydra_main, require_dir, required
from .family import FamilyParams, degrade_family
from .translator import DegradeParams, degrade_translator

DEFAULT_DEGRADATION = "translator"     # the product's own recipe: stage2.degrade's default (stage2.train: family)
RECIPES = ("translator", "family")    # the `recipe` key of a conf/degradation/ entry


Params = DegradeParams | FamilyParams


def load_params(values: Mapping[str, Any]) -> Params:
    """The `degrade` config node as DegradeParams (recipe translator, the default) or FamilyParams (family)."""
    recipe = str(values.get("recipe", "translator"))
    if recipe not in RECIPES:
        raise ValueError(f"degradation recipe {recipe!r} is unknown: use one of {list(RECIPES)}")
    return FamilyParams.from_mapping(values) if recipe == "family" else DegradeParams.from_mapping(values)


def load_config(name: str = DEFAULT_DEGRADATION) -> Params:
    """The entry `conf/degradation/<name>.yaml`, either recipe (for notebooks, tests and benchmarks)."""
    from omegaconf import OmegaConf

    return load_params(OmegaConf.load(CONF_DIR / "degradation" / f"{name}.yaml"))


def degrade(truth: np.ndarray, rng: np.random.Generator | int | np.random.SeedSequence, params: Params) -> np.ndarray:
    """A float32 (4, H, W) imitation of a Stage 1 output of the true optical tile `truth` (4, H, W) in [0, 1]."""
    rng = np.random.default_rng(rng)
    x = np.asarray(truth, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] != 4:
        raise ValueError(f"degrade expects a (4, H, W) array, got shape {x.shape}")
    if isinstance(params, FamilyParams):
        return degrade_family(x, rng, params)
    return degrade_translator(x, rng, params)


def tile_seed(seed: int, name: str) -> np.random.SeedSequence:
    """A tile's own seed from the run seed and its name (independent of the other tiles)."""
    return np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))])


def degrade_dir(truth_dir: str | Path, output_dir: str | Path, seed: int, params: Params) -> list[Path]:
    """Degrade every opt_v1 tile of `truth_dir` into `output_dir` (NPZ `opt_v1` + the sidecar, copied).

    The result is a Stage 1 stand-in folder that `python -m stage2.predict` reads. Returns the written NPZs.
    """
    from ..tiles import TileError, discover, read_tile

    truth_dir, output_dir = Path(truth_dir), Path(output_dir)
    require_dir(truth_dir, "truth_dir", "point it at a folder of true optical tiles (opt_v1 format)")
    files, _ = discover(truth_dir)
    if not files:
        raise RunError(f"No NPZ tiles found in {truth_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        try:
            tile = read_tile(f, truth_dir)
        except TileError as e:
            raise RunError(f"{f}: {e.reason} ({e.hint})") from None
        out = output_dir / f"{f.stem}.npz"
        arr = degrade(tile.array, tile_seed(seed, f.stem), params)
        atomic_write(out, lambda fh, a=arr: np.savez(fh, opt_v1=a))
        side = f.with_suffix(".json")
        if side.is_file():
            shutil.copyfile(side, out.with_suffix(".json"))
        written.append(out)
    atomic_write_text(output_dir / "_degradation.json", json.dumps(
        {"truth_dir": str(truth_dir), "seed": int(seed), "recipe": _recipe(params), "params": asdict(params)},
        indent=2) + "\n")
    return written


def _recipe(params: Params) -> str:
    return "family" if isinstance(params, FamilyParams) else "translator"


def degrade_app(cfg: DictConfig) -> int:
    """The degrade command's steps: check the settings and folders, degrade, say what was written."""
    try:
        params = load_params(cfg.degrade)
    except (TypeError, ValueError) as e:
        raise RunError(str(e)) from None
    truth_dir = required(cfg, "truth_dir", "the folder of true optical tiles")
    output_dir = required(cfg, "output_dir", "where the Stage 1 stand-ins go")
    written = degrade_dir(truth_dir, output_dir, int(cfg.seed), params)
    extra = "" if isinstance(params, DegradeParams) else f", family kinds {','.join(params.active())}"
    print(f"degraded {len(written)} tiles from {truth_dir} into {output_dir} (seed {int(cfg.seed)}{extra})")
    return 0


def run(cfg: DictConfig) -> int:
    """Degrade `truth_dir` into `output_dir`; exit code 0, or 2 on a bad folder, tile or setting."""
    return guarded(lambda: degrade_app(cfg), cfg, prog="stage2.degrade")


main = hydra_main("degrade", run)
