"""Tiles of any size on real Sentinel-2 data (SPEC 9): no seam where windows meet on a mosaic of the
examples' tiles, and `nan_policy=mask` on a swath edge, whole and windowed.

One run (`nan_policy=mask`, the default window settings) over: a 768 x 768 mosaic of nine real
256 px tiles (16 windows), the same mosaic with its left third NaN, a real 256 px tile with and
without its left third NaN, and a tile with no valid pixel.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, read_opt_v2, run_cli

SIZE, OVERLAP = 256, 64
FLOOR = 1e-3
MOSAIC_TILES = 3                  # 3 x 3 tiles of 256 px
SWATH = "mtom_t48que_20200223_r300_c800_256x256"   # a real 256 px tile of the demo AOI
MARGIN = 8                        # px around a window border that count neither as border nor inside


def _mosaic() -> np.ndarray:
    files = sorted(f for f in (REPO / "examples" / "train_optical").glob("*.npz")
                   if np.load(f)["opt_v1"].shape == (4, 256, 256))[:MOSAIC_TILES ** 2]
    tiles = [np.load(f)["opt_v1"] for f in files]
    rows = [np.concatenate(tiles[i:i + MOSAIC_TILES], axis=2) for i in range(0, len(tiles), MOSAIC_TILES)]
    return np.concatenate(rows, axis=1)


def _left_third_nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[:, :, :a.shape[2] // 3] = np.nan
    return a


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_ckpt):
    root = tmp_path_factory.mktemp("real")
    inp = root / "in"
    inp.mkdir()
    swath = np.load(REPO / "examples" / "demo_aoi" / f"{SWATH}.npz")["opt_v1"]
    arrays = {"mosaic": _mosaic(), "full": swath, "swath": _left_third_nan(swath)}
    arrays["mosaic_swath"] = _left_third_nan(arrays["mosaic"])
    arrays["nodata"] = np.full((4, 64, 64), np.nan, np.float32)
    for name, a in arrays.items():
        np.savez(inp / f"{name}.npz", opt_v1=a)
        (inp / f"{name}.json").write_text(json.dumps({"month": 6, "biome_code": 4}))
    out = root / "out"
    r = run_cli([f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu", "precision=32",
                 "batch_size=4", "nan_policy=mask"], cwd=root)
    assert r.returncode == 1, r.stderr[-3000:]            # the tile with no valid pixel
    return root, arrays, out


# ---------------------------------------------------------------------------- seams
BOX = 16        # px: the patch size; a box this wide holds one whole period of the patch-scale texture
SEGMENT = 64    # px along a line over which a step is averaged with its sign


def _starts(length: int) -> list[int]:
    """Window starts on a side that is a multiple of 16 px (see test_windows.starts)."""
    n = math.ceil((length - SIZE) / (SIZE - OVERLAP)) + 1
    return [16 * (i * ((length - SIZE) // 16) // (n - 1)) for i in range(n)]


def _steps(d: np.ndarray, axis: int) -> np.ndarray:
    """|mean of d over the BOX px after position x - mean over the BOX px before|, averaged with its
    sign over SEGMENT px along the line, then over segments and bands: one value per x."""
    dd = np.moveaxis(d, axis, 2)                                   # steps along the last axis
    c = np.cumsum(np.pad(dd, ((0, 0), (0, 0), (1, 0))), axis=2)
    xs = np.arange(BOX, dd.shape[2] - BOX + 1)
    step = (c[:, :, xs + BOX] - 2 * c[:, :, xs] + c[:, :, xs - BOX]) / BOX
    n = step.shape[1] // SEGMENT * SEGMENT
    per_segment = step[:, :n].reshape(4, -1, SEGMENT, xs.size).mean(axis=2)
    return xs, np.abs(per_segment).mean(axis=(0, 1))


def seam_ratio(v1: np.ndarray, v2: np.ndarray, lines: list[int], avoid: list[int]) -> float:
    """The step of the change `opt_v2 - opt_v1` across `lines` over the same step inside windows.

    Why this detects seams fairly: a seam is the refinement jumping where one window's output gives
    way to another's. It shows in the *change* (the image's own edges are in v1 and v2 alike and
    mostly cancel), as a step between the change's level on one side and on the other, coherent
    along the border line (its sign holds over many px, where texture's does not). The step is
    taken between BOX-px means, a whole period of the ViT's patch-scale texture, so that texture,
    which is the same on either side of a border, cancels too. The same measure at every column
    and row at least BOX px from any line is the baseline, so the ratio is about 1 where nothing
    happens at the lines; lines near `avoid` (the mosaic's own tile borders, where the image itself
    changes) count on neither side. test_the_seam_ratio_sees_a_small_seam shows its sensitivity.
    """
    d = v2.astype(np.float64) - v1.astype(np.float64)
    border, inside = [], []
    for axis in (1, 2):
        xs, steps = _steps(d, axis)
        border.append(steps[np.isin(xs, lines) & ~_near(xs, avoid)])
        inside.append(steps[~_near(xs, lines) & ~_near(xs, avoid)])
    return float(np.concatenate(border).mean() / np.concatenate(inside).mean())


def _near(xs: np.ndarray, pos: list[int]) -> np.ndarray:
    return np.min(np.abs(xs[:, None] - np.array(pos)[None, :]), axis=1) < BOX


def _lines(length: int) -> dict[str, list[int]]:
    """Where a seam could be: where windows begin, where they end, and the middles of their overlaps."""
    s = _starts(length)
    return {"window starts": [a for a in s if a > 0], "window ends": [a + SIZE for a in s if a + SIZE < length],
            "overlap middles": [(a + SIZE + b) // 2 for a, b in zip(s, s[1:], strict=False)]}


MOSAIC_BORDERS = [256, 512]


def test_no_seam_where_windows_meet_on_a_real_mosaic(real_run):
    root, arrays, out = real_run
    v1, v2 = arrays["mosaic"], read_opt_v2(out / "mosaic.npz")
    assert json.loads((out / "mosaic.json").read_text())["processing"]["windows"]["count"] == 16
    for family, lines in _lines(768).items():
        ratio = seam_ratio(v1, v2, lines, MOSAIC_BORDERS)
        print(f"seam ratio at {family} {lines}: {ratio:.3f}")
        assert ratio < 1.15, family


def test_the_seam_ratio_sees_a_small_seam(real_run):
    """The same output with a seam of 0.005 reflectance (a tenth of the mean refinement) put in
    where windows begin: the ratio flags it."""
    root, arrays, out = real_run
    v1, v2 = arrays["mosaic"], read_opt_v2(out / "mosaic.npz")
    seamed = v2.astype(np.float64)
    starts = _lines(768)["window starts"]
    for k, a in enumerate(starts):
        sign = 0.005 if k % 2 == 0 else -0.005
        seamed[:, :, a:] += sign
        seamed[:, a:, :] += sign
    assert np.abs(v2 - v1).mean() > 0.02                               # 0.005 is small next to the change
    ratio = seam_ratio(v1, seamed, starts, MOSAIC_BORDERS)
    print(f"seam ratio with a 0.005 seam: {ratio:.3f}")
    assert ratio > 1.5


# ---------------------------------------------------------------------------- nan_policy=mask
@pytest.mark.parametrize("name,full", [("swath", "full"), ("mosaic_swath", "mosaic")])
def test_nan_swath_edge_is_no_data_out_and_the_rest_is_refined_as_without_it(real_run, name, full):
    root, arrays, out = real_run
    v1 = arrays[full]
    v2, v2_full = read_opt_v2(out / f"{name}.npz"), read_opt_v2(out / f"{full}.npz")
    h, w = v1.shape[1:]
    edge = w // 3
    assert v2.shape == v1.shape and v2.dtype == np.float32
    assert np.isnan(v2[:, :, :edge]).all()                                # NaN exactly where the input had none
    valid = v2[:, :, edge:]
    assert np.isfinite(valid).all() and valid.min() >= 0 and valid.max() <= 1
    js = json.loads((out / f"{name}.json").read_text())
    assert js["processing"]["masked_pixels"] == h * edge
    assert js["quality"]["ndvi_rmse"] is not None                       # quality of the valid pixels, JSON-safe
    # Away from the edge (32 px: two patches), the valid part is refined like the same tile without
    # NaN: the difference is a small part of the refinement itself (the encoder attends over the
    # whole window, so the filled pixels reach everywhere a little).
    away = slice(edge + 32, None)
    diff = np.abs(v2[:, :, away] - v2_full[:, :, away]).mean()
    change = np.abs(v2_full[:, :, away] - v1[:, :, away]).mean()
    print(f"{name}: mean |masked - unmasked| {diff:.2e}, mean refinement {change:.2e}")
    assert diff < 0.15 * change


def test_a_tile_with_no_valid_pixel_fails_with_its_reason(real_run):
    root, arrays, out = real_run
    failures = [json.loads(line) for line in (out / "_stage2_failures.jsonl").read_text().splitlines()]
    assert [Path(f["file"]).name for f in failures] == ["nodata.npz"]
    assert failures[0]["reason"].startswith("no valid pixel") and failures[0]["hint"]
    summary = json.loads((out / "_stage2_summary.json").read_text())
    assert (summary["processed"], summary["failed"]) == (4, 1)
