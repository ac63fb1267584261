"""A family of SAR-to-optical translator errors: every sample draws its own kinds and strengths.

`stage2.train.degrade`'s `translator` recipe applies one fixed chain (shift, Gaussian blur,
contrast, gain/offset, speckle, noise) with narrow ranges; a refiner trained on it learns to undo
that simulator and little else. Real Stage 1 errors vary by model, scene and season, so this
family draws, per sample, which kinds of error occur (each with probability `p`) and how strong
each is (uniform in its config ranges), plus a share of clean samples left untouched, so the
refiner also learns to leave a good input alone.

The kinds (`KINDS`, applied in this order; each function's docstring says why it is there):
geometry (shift, misregistration), loss of detail (blur, smear), invented detail (texture),
colour (gain_offset, contrast, saturation, colour_shift, haze), noise (noise, speckle) and
export artefacts (quantise, jpeg); `translator`, the product's own recipe, is a kind too (so the
refiner still learns the errors `stage2.degrade` makes). Settings: conf/degradation/family.yaml; `exclude` leaves kinds
out (leave-one-kind-out training), `only` keeps just the listed ones (testing on one kind).

Deterministic: one numpy Generator per sample; every kind's coin is tossed and every kind has its
own child stream, so leaving a kind out does not change what the other kinds draw for a (tile, seed).
Pure numpy and scipy, a few ms per 96 px crop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from scipy import fft, ndimage

from .translator import DegradeParams, degrade_translator

Kind = Callable[[np.ndarray, np.random.Generator, Mapping[str, Any]], np.ndarray]


def _u(rng: np.random.Generator, lohi: Any) -> float:
    lo, hi = lohi
    return float(rng.uniform(float(lo), float(hi)))


# ---------------------------------------------------------------------------------------- geometry
def shift(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Whole-tile shift, sub-pixel or whole pixels: SAR and optical geometries never line up exactly."""
    d = rng.uniform(-c["max_px"], c["max_px"], 2)
    if rng.random() < 0.5:            # whole pixels, at least one
        i = int(np.argmax(np.abs(d)))
        d = np.round(d)
        d[i] = d[i] or np.copysign(1.0, d[i])
    return ndimage.shift(y, (0, d[0], d[1]), order=1, mode="reflect")


def misregistration(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Each band shifted on its own: translators decode bands from separate heads and misalign them."""
    d = rng.uniform(-c["max_px"], c["max_px"], (y.shape[0], 2))
    return np.stack([ndimage.shift(b, tuple(s), order=1, mode="reflect") for b, s in zip(y, d, strict=True)])


# ---------------------------------------------------------------------------------------- lost detail
def _disk(r: float) -> np.ndarray:
    n = int(np.ceil(r))
    yy, xx = np.mgrid[-n:n + 1, -n:n + 1]
    k = (yy ** 2 + xx ** 2 <= r ** 2 + 0.5).astype(np.float64)
    return k / k.sum()


def _line(length: float, angle: float) -> np.ndarray:
    n = int(np.ceil(length / 2))
    k = np.zeros((2 * n + 1, 2 * n + 1))
    for t in np.linspace(-length / 2, length / 2, max(3, int(4 * length))):
        k[int(round(n + t * np.sin(angle))), int(round(n + t * np.cos(angle)))] = 1.0
    return k / k.sum()


def blur(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Blur of varying width and shape (Gaussian, anisotropic Gaussian, defocus disk, motion line):
    the most reported translator error, over-smoothing from pixel losses and upsampling decoders."""
    w = _u(rng, c["width"])
    shape = int(rng.integers(4))
    if shape == 0:
        return ndimage.gaussian_filter(y, (0, w, w), mode="reflect")
    if shape == 1:
        return ndimage.gaussian_filter(y, (0, w, w * _u(rng, (0.2, 0.6))), mode="reflect")
    k = _disk(max(w, 1.0)) if shape == 2 else _line(2 * w + 1, _u(rng, (0.0, np.pi)))
    return np.stack([ndimage.convolve(b, k, mode="reflect") for b in y])


def smear(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Smeared texture: a median filter (flat, painterly patches with kept edges) or a coarse
    resample (blocky loss of resolution) - the smudged fields GAN translators are known for."""
    if rng.random() < 0.5:
        s = int(rng.integers(int(c["median"][0]), int(c["median"][1]) + 1))
        return ndimage.median_filter(y, size=(1, s, s), mode="reflect")
    f = _u(rng, c["factor"])
    h, w = y.shape[1:]
    small = ndimage.zoom(y, (1, 1 / f, 1 / f), order=1, mode="nearest", grid_mode=True)
    big = ndimage.zoom(small, (1, h / small.shape[1], w / small.shape[2]), order=1, mode="nearest", grid_mode=True)
    return big[:, :h, :w]


# ---------------------------------------------------------------------------------------- invented detail
def texture(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Hallucinated texture: band-correlated, spatially coloured multiplicative pattern - GAN
    translators invent plausible-looking detail (furrows, canopy) that is not on the ground."""
    n = ndimage.gaussian_filter(rng.standard_normal(y.shape[1:]), _u(rng, c["scale_px"]), mode="wrap")
    n /= max(float(n.std()), 1e-9)
    amp = _u(rng, c["amplitude"]) * (1 + rng.normal(0, 0.2, (y.shape[0], 1, 1)))
    return y * (1 + amp * n[None])


# ---------------------------------------------------------------------------------------- colour
def gain_offset(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Per-band gain and offset drift: translators miss the absolute radiometry band by band."""
    b = y.shape[0]
    gain = 1 + rng.normal(0, c["gain_sd"], (b, 1, 1))
    return gain * y + rng.normal(0, c["offset_sd"], (b, 1, 1))


def contrast(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Contrast change towards or away from a typical reflectance: pixel losses regress to the
    mean (washed out), adversarial losses sometimes overshoot (too punchy)."""
    anchor = np.asarray(c["anchor"], dtype=np.float64)[:, None, None]
    return anchor + _u(rng, c["factor"]) * (y - anchor)


def saturation(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Saturation change of the visible bands around their grey level: greyish or garish colours."""
    grey = y[:3].mean(axis=0, keepdims=True)
    out = y.copy()
    out[:3] = grey + _u(rng, c["factor"]) * (y[:3] - grey)
    return out


def colour_shift(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Colour (spectral) shift: bands mixed by a near-identity matrix, partly varying across the
    tile - the wrong hues of vegetation, water and soil the SAR-to-optical literature reports."""
    b = y.shape[0]
    mix = np.eye(b) + rng.normal(0, c["mix_sd"], (b, b))
    mixed = np.einsum("ij,jhw->ihw", mix, y)
    w = _smooth_field(y.shape[1:], rng, 48.0)          # where the shift applies, 0..1
    return y + w[None] * (mixed - y)


def _smooth_field(hw: tuple[int, int], rng: np.random.Generator, scale_px: float) -> np.ndarray:
    """A smooth random field in [0, 1] varying over about `scale_px` pixels (cubic upsampled grid)."""
    h, w = hw
    gy, gx = int(np.ceil(h / scale_px)) + 2, int(np.ceil(w / scale_px)) + 2
    grid = rng.uniform(0, 1, (gy, gx))
    field_ = ndimage.zoom(grid, (h / (gy - 1), w / (gx - 1)), order=3, mode="nearest", grid_mode=False)
    return np.clip(field_[:h, :w], 0, 1)


def haze(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Haze-like additive layer: a smooth low-frequency field, strongest in blue and weakest in
    NIR as path radiance is - translators trained on imperfect cloud masks reproduce it."""
    f = _smooth_field(y.shape[1:], rng, _u(rng, c["scale_px"]))
    weights = np.asarray(c["band_weights"], dtype=np.float64)[:, None, None]
    return y + _u(rng, c["amplitude"]) * weights * f[None]


# ---------------------------------------------------------------------------------------- noise
def noise(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Additive Gaussian noise: sensor-like grain and decoder noise."""
    return y + rng.normal(0, _u(rng, c["sd"]), y.shape)


def speckle(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Multiplicative gamma speckle, mean 1: SAR speckle leaking through the translator."""
    sd = _u(rng, c["sd"])
    looks = 1.0 / sd ** 2
    return y * rng.gamma(looks, 1.0 / looks, y.shape)


# ---------------------------------------------------------------------------------------- export artefacts
def quantise(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """Coarse radiometric steps: Stage 1 outputs exported as 8-bit (or scaled integers) and read back."""
    step = _u(rng, c["step"])
    return np.round(y / step) * step


def jpeg(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """JPEG-like blocking: 8x8 block DCT with frequency-weighted coefficient quantisation -
    translators fed or trained on lossy-compressed imagery, and patch-wise decoders, leave block seams."""
    q = _u(rng, c["step"])
    b, h, w = y.shape
    ph, pw = -h % 8, -w % 8
    x = np.pad(y, ((0, 0), (0, ph), (0, pw)), mode="symmetric")
    blocks = x.reshape(b, x.shape[1] // 8, 8, x.shape[2] // 8, 8)
    coef = fft.dctn(blocks, axes=(2, 4), norm="ortho")
    u = np.arange(8)
    table = (q * (1 + u[:, None] + u[None, :])).reshape(1, 1, 8, 1, 8)
    coef = np.round(coef / table) * table
    out = fft.idctn(coef, axes=(2, 4), norm="ortho").reshape(x.shape)
    return out[:, :h, :w]


# ---------------------------------------------------------------------------------------- the product's own
def translator(y: np.ndarray, rng: np.random.Generator, c: Mapping[str, Any]) -> np.ndarray:
    """The product's own recipe (stage2.train.degrade.DegradeParams, the demo's Stage 1 stand-ins) as
    one kind: a refiner trained on the family still learns the errors the demo and `stage2.degrade` make."""
    params = DegradeParams.from_mapping({k: v for k, v in c.items() if k != "p"})
    return degrade_translator(np.clip(y, 0.0, 1.0), rng, params).astype(np.float64)


KINDS: dict[str, Kind] = {f.__name__: f for f in (
    translator, shift, misregistration, blur, smear, texture, gain_offset, contrast, saturation, colour_shift,
    haze, noise, speckle, quantise, jpeg)}


# ---------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class FamilyParams:
    """conf/degradation/family.yaml: the share of clean samples and every kind's `p` and ranges."""

    clean_fraction: float
    kinds: dict[str, dict[str, Any]]
    exclude: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    recipe: str = field(default="family", init=False)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FamilyParams:
        """From the `degrade` node (recipe: family); unknown or missing keys and kinds are an error."""
        v = OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)
        v.pop("recipe", None)
        known = {"clean_fraction", "kinds", "exclude", "only"}
        unknown, missing = set(v) - known, {"clean_fraction", "kinds"} - set(v)
        if unknown or missing:
            raise ValueError(f"degradation keys (recipe family): unknown {sorted(unknown)}, missing "
                             f"{sorted(missing)}; expected {sorted(known)}")
        kinds = {k: dict(c) for k, c in dict(v["kinds"]).items()}
        names = [*kinds, *_names(v.get("exclude")), *_names(v.get("only"))]
        bad = sorted(set(names) - set(KINDS))
        if bad:
            raise ValueError(f"degradation kinds: unknown {bad}; the family's kinds are {list(KINDS)}")
        if set(KINDS) - set(kinds):
            raise ValueError(f"degradation kinds: missing {sorted(set(KINDS) - set(kinds))} in `kinds`")
        if not 0 <= float(v["clean_fraction"]) <= 1:
            raise ValueError(f"clean_fraction must be in [0, 1], got {v['clean_fraction']}")
        p = cls(float(v["clean_fraction"]), kinds, _names(v.get("exclude")), _names(v.get("only")))
        if not p.active():
            raise ValueError(f"degradation: exclude {list(p.exclude)} and only {list(p.only)} leave no kind")
        return p

    def active(self) -> list[str]:
        """The kinds a sample may draw, in application order."""
        return [k for k in KINDS if k not in self.exclude and (not self.only or k in self.only)]

    def restricted(self, *, only: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                   clean_fraction: float | None = None) -> FamilyParams:
        """The same family with other `only` / `exclude` / clean share (leave-one-kind-out)."""
        cf = self.clean_fraction if clean_fraction is None else float(clean_fraction)
        return FamilyParams(cf, self.kinds, tuple(exclude), tuple(only))


def _names(v: Any) -> tuple[str, ...]:
    if v in (None, ""):
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, (list, tuple, ListConfig)):
        return tuple(str(x) for x in v)
    raise ValueError(f"exclude / only must be a list of kind names, got {v!r}")


def draw_kinds(rng: np.random.Generator, params: FamilyParams) -> list[str]:
    """Which kinds this sample gets: [] for a clean sample, else each active kind with its `p`; when
    no coin fires, the active kind nearest to firing (smallest coin / p). Every kind's coin is tossed,
    excluded or not, so leaving kinds out changes no other kind's draw."""
    clean = rng.random() < params.clean_fraction
    coins = {k: rng.random() for k in KINDS}
    if clean:
        return []
    active = params.active()
    odds = {k: coins[k] / max(float(params.kinds[k]["p"]), 1e-9) for k in active}
    chosen = [k for k in active if odds[k] < 1.0]
    return chosen or [min(active, key=odds.__getitem__)]


def degrade_family(truth: np.ndarray, rng: np.random.Generator, params: FamilyParams) -> np.ndarray:
    """A float32 (4, H, W) imitation of a Stage 1 output: this sample's kinds applied in order, clipped."""
    y = np.asarray(truth, dtype=np.float64)
    chosen = draw_kinds(rng, params)
    seeds = dict(zip(KINDS, rng.integers(0, 2 ** 63, len(KINDS)), strict=True))   # one stream per kind
    for name in chosen:
        y = KINDS[name](y, np.random.default_rng(int(seeds[name])), params.kinds[name])
    return np.clip(y, 0.0, 1.0).astype(np.float32)
