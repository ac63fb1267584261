"""How a tile is shown to a person: the guide's RGB display and its brightness stretch.

Shared by the report's and the evaluation's PNGs, so that a tile looks the same in both and their
pictures can be compared side by side. NumPy only: the pipelines that draw import matplotlib
themselves, inside the functions that draw.
"""

from __future__ import annotations

import numpy as np

RGB_GAIN = 2.0          # the guide's display stretch: reflectance x 2, clipped to [0, 1]
DARK = 0.1              # a tile whose x2 display has its 99th percentile below this looks black


def rgb(opt: np.ndarray, gain: float = RGB_GAIN) -> np.ndarray:
    """(H, W, 3) display image of a (4, H, W) tile as the guide makes it: R=B04, G=B03, B=B02, x2, clipped.

    With no-data (NaN) pixels: (H, W, 4), transparent there.
    """
    opt = np.asarray(opt, dtype=np.float32)
    img = np.clip(np.stack([opt[2], opt[1], opt[0]], axis=-1) * gain, 0.0, 1.0)
    nodata = np.isnan(img).any(axis=-1)
    if not nodata.any():
        return img
    return np.concatenate([np.nan_to_num(img), (~nodata)[..., None].astype(np.float32)], axis=-1)


def display_gain(reference: np.ndarray) -> float:
    """The guide's x2, or for a very dark tile (water, shadow) a stronger gain so it is not black.

    Taken from one reference tile and used for every panel beside it, so that the panels stay comparable.
    """
    p99 = float(np.nanpercentile(np.asarray(reference)[:3], 99))
    if p99 * RGB_GAIN >= DARK or not p99 > 0:
        return RGB_GAIN
    return 0.9 / p99
