"""The product's own degradation recipe (`conf/degradation/translator.yaml`): its settings and its chain.

Documented in stage2.train.degrade (which runs it for `stage2.degrade` and training); a module of its
own so the error family (stage2.train.family) can use it as one of its kinds without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from omegaconf import ListConfig
from scipy import ndimage

from .. import CONF_DIR


@dataclass(frozen=True)
class DegradeParams:
    """Ranges of the degradation; (lo, hi) pairs are sampled uniformly per tile.

    The values live in conf/degradation/*.yaml (the `degrade` key of train.yaml and degrade.yaml).
    """

    max_shift: float
    blur_sigma: tuple[float, float]
    contrast: tuple[float, float]
    anchor: tuple[float, float, float, float]   # typical land reflectance [B02, B03, B04, B08]
    gain_sd: float
    offset_sd: float
    speckle_sd: tuple[float, float]
    noise_sd: tuple[float, float]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DegradeParams:
        """From a config mapping (the `degrade` node); unknown or missing keys are an error."""
        values = dict(values)
        values.pop("recipe", None)
        known = {f.name for f in fields(cls)}
        unknown, missing = set(values) - known, known - set(values)
        if unknown or missing:
            raise ValueError(f"degradation keys: unknown {sorted(unknown)}, missing {sorted(missing)}; "
                             f"expected {sorted(known)}")
        conv = {k: tuple(float(x) for x in v) if isinstance(v, (list, tuple, ListConfig)) else float(v)
                for k, v in values.items()}
        return cls(**conv)

    @classmethod
    def from_config(cls, name: str = "translator") -> DegradeParams:
        """The entry `conf/degradation/<name>.yaml` (for notebooks and tests; apps compose it)."""
        from omegaconf import OmegaConf

        return cls.from_mapping(OmegaConf.load(CONF_DIR / "degradation" / f"{name}.yaml"))


def degrade_translator(x: np.ndarray, rng: np.random.Generator, params: DegradeParams) -> np.ndarray:
    """The recipe's chain on a float64 (4, H, W) tile: shift, blur, contrast, gain/offset, speckle, noise, clip."""
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
