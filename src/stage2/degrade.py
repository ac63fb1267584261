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

`python -m stage2.degrade truth_dir=DIR output_dir=DIR seed=N` writes opt_v1 tiles + sidecars.
"""

from __future__ import annotations

import json
import shutil
import sys
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

# Typical Sentinel-2 surface reflectance of land [B02, B03, B04, B08]: what a translator regresses to.
DEFAULT_ANCHOR = (0.06, 0.09, 0.09, 0.25)


@dataclass(frozen=True)
class DegradeParams:
    """Ranges of the degradation; (lo, hi) pairs are sampled uniformly per tile."""

    max_shift: float = 0.5
    blur_sigma: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.8, 0.9)
    anchor: tuple[float, float, float, float] = DEFAULT_ANCHOR
    gain_sd: float = 0.02
    offset_sd: float = 0.005
    speckle_sd: tuple[float, float] = (0.03, 0.08)
    noise_sd: tuple[float, float] = (0.005, 0.015)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "DegradeParams":
        """From a config mapping (e.g. the `degrade` block of conf/train.yaml); unknown keys are an error."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown degradation keys {sorted(unknown)}; known: {sorted(known)}")
        conv = {k: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)
                for k, v in values.items()}
        return cls(**conv)


def degrade(truth: np.ndarray, rng: np.random.Generator | int,
            params: DegradeParams = DegradeParams()) -> np.ndarray:
    """A float32 (4, H, W) imitation of a Stage 1 output of the true optical tile `truth` (4, H, W) in [0, 1]."""
    rng = np.random.default_rng(rng)
    x = np.asarray(truth, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] != 4:
        raise ValueError(f"degrade expects a (4, H, W) array, got shape {x.shape}")
    bands = x.shape[0]
    p = params
    dy, dx = rng.uniform(-p.max_shift, p.max_shift, 2) if p.max_shift > 0 else (0.0, 0.0)
    sigma = rng.uniform(*p.blur_sigma)
    c = rng.uniform(*p.contrast)
    gain = 1.0 + rng.normal(0.0, p.gain_sd, bands)
    offset = rng.normal(0.0, p.offset_sd, bands)
    speckle_sd = rng.uniform(*p.speckle_sd)
    noise_sd = rng.uniform(*p.noise_sd)

    y = ndimage.shift(x, (0, dy, dx), order=1, mode="reflect")
    y = ndimage.gaussian_filter(y, sigma=(0, sigma, sigma), mode="reflect")
    anchor = np.asarray(p.anchor, dtype=np.float64)[:, None, None]
    y = anchor + c * (y - anchor)
    y = gain[:, None, None] * y + offset[:, None, None]
    if speckle_sd > 0:
        looks = 1.0 / speckle_sd ** 2          # gamma(k, 1/k): mean 1, sd 1/sqrt(k)
        y = y * rng.gamma(looks, 1.0 / looks, y.shape)
    if noise_sd > 0:
        y = y + rng.normal(0.0, noise_sd, y.shape)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def tile_seed(seed: int, name: str) -> np.random.SeedSequence:
    """A tile's own seed from the run seed and its name (independent of the other tiles)."""
    return np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))])


def degrade_dir(truth_dir: str | Path, output_dir: str | Path, seed: int,
                params: DegradeParams = DegradeParams()) -> list[Path]:
    """Degrade every opt_v1 tile of `truth_dir` into `output_dir` (NPZ `opt_v1` + the sidecar, copied).

    The result is a Stage 1 stand-in folder that `python -m stage2.predict` reads. Returns the written NPZs.
    """
    from .tiles import TileError, discover, read_tile

    truth_dir, output_dir = Path(truth_dir), Path(output_dir)
    files, _ = discover(truth_dir)
    if not files:
        raise FileNotFoundError(f"No NPZ tiles found in {truth_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        try:
            tile = read_tile(f, truth_dir)
        except TileError as e:
            raise ValueError(f"{f}: {e.reason} ({e.hint})") from None
        out = output_dir / f"{f.stem}.npz"
        np.savez(out, opt_v1=degrade(tile.array, tile_seed(seed, f.stem), params))
        side = f.with_suffix(".json")
        if side.is_file():
            shutil.copyfile(side, out.with_suffix(".json"))
        written.append(out)
    (output_dir / "_degradation.json").write_text(
        json.dumps({"truth_dir": str(truth_dir), "seed": int(seed), "params": asdict(params)}, indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI, key=value like the other stage2 commands: truth_dir=DIR output_dir=DIR [seed=N] [<param>=...]."""
    from omegaconf import OmegaConf

    args = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m stage2.degrade truth_dir=DIR output_dir=DIR [seed=N] "
             f"[{'|'.join(f.name for f in fields(DegradeParams))}=VALUE ...]")
    if any(a in ("-h", "--help") for a in args):
        print(__doc__ + "\n" + usage)
        return 0
    try:
        cfg = OmegaConf.to_container(OmegaConf.from_dotlist(args))
        truth_dir, output_dir = cfg.pop("truth_dir", None), cfg.pop("output_dir", None)
        seed = int(cfg.pop("seed", 0))
        if not truth_dir or not output_dir:
            raise ValueError("truth_dir and output_dir are required")
        written = degrade_dir(truth_dir, output_dir, seed, DegradeParams.from_mapping(cfg))
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"stage2.degrade: error: {e}\n{usage}", file=sys.stderr)
        return 2
    print(f"degraded {len(written)} tiles from {truth_dir} into {output_dir} (seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
