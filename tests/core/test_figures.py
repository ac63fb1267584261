"""The RGB display the report's and the evaluation's PNGs share (stage2.figures)."""

from __future__ import annotations

import numpy as np

from stage2.figures import RGB_GAIN, display_gain, rgb


def test_rgb_is_the_guides_display_b04_b03_b02_times_two_clipped():
    opt = np.stack([np.full((2, 3), v, np.float32) for v in (0.1, 0.2, 0.3, 0.9)])     # B02 B03 B04 B08
    img = rgb(opt)
    assert img.shape == (2, 3, 3)
    assert np.allclose(img[0, 0], [0.6, 0.4, 0.2])
    assert rgb(opt * 4).max() == 1.0


def test_no_data_is_transparent():
    opt = np.full((4, 2, 2), 0.2, np.float32)
    opt[:, 0, 0] = np.nan
    img = rgb(opt)
    assert img.shape == (2, 2, 4) and np.isfinite(img).all()
    assert img[0, 0, 3] == 0.0 and img[1, 1, 3] == 1.0


def test_a_dark_tile_gets_a_stronger_gain_and_a_normal_one_the_guides():
    assert display_gain(np.full((4, 8, 8), 0.2, np.float32)) == RGB_GAIN
    dark = np.full((4, 8, 8), 0.01, np.float32)
    assert display_gain(dark) > RGB_GAIN and rgb(dark, display_gain(dark)).max() > 0.5
    assert display_gain(np.zeros((4, 8, 8), np.float32)) == RGB_GAIN      # no signal: nothing to stretch
