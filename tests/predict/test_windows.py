"""Tiles of any size (SPEC 9): windows placed flush, blended with weights that sum to 1, assembled by
the writer; the same result whatever the batch, the other tiles or the workers; a kill mid-tile
leaves nothing a rerun trusts.

The blend is checked against a computation written here from SPEC 9's words (window starts, raised
cosine with a floor of 1e-3, sum(w * y) / sum(w)), not with stage2's own helpers.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import stage2
from helpers import make_tile, read_opt_v2, run_cli
from stage2.formats import load_tile
from stage2.model import CONF_DIR
from stage2.predict.app import run
from stage2.predict.data import SizeBucketBatchSampler, TileDataModule
from stage2.predict.windows import Assembly, WindowRef, WindowSettings, WindowSource, grid_for, positions
from stage2.quality import tile_quality
from stage2.tiles import TileFailure

SIZE, OVERLAP, ABOVE = 256, 64, 512          # conf/predict.yaml's defaults
FLOOR = 1e-3
CPU = ["hardware=cpu", "precision=32"]


# ---------------------------------------------------------------------------- an independent blend
def starts(length: int, size: int = SIZE, overlap: int = OVERLAP, patch: int = 16) -> tuple[list[int], int]:
    """SPEC 9's placement as this project reads it: windows of `size` px start on the model's patch
    grid, at most size - overlap apart, evenly from 0 to flush with the side padded to the patch
    size. Returns the starts and the window's side (the padded side where that is shorter)."""
    padded = length + (-length) % patch
    win = min(size, padded)
    if padded <= win:
        return [0], win
    n = math.ceil((padded - win) / (size - overlap)) + 1
    return [patch * (i * ((padded - win) // patch) // (n - 1)) for i in range(n)], win


def raised_cosine(n: int) -> np.ndarray:
    return FLOOR + (1 - FLOOR) * np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2


def blend(model, v1: np.ndarray, month: int, biome: int) -> np.ndarray:
    """The model on each window alone (batch 1; it reflect-pads a window cut short by the tile's
    edge itself), blended in float64: sum(w * y) / sum(w)."""
    h, w = v1.shape[1:]
    (ys, wh), (xs, ww) = starts(h), starts(w)
    weight = np.outer(raised_cosine(wh), raised_cosine(ww))
    num, den = np.zeros((4, h, w)), np.zeros((h, w))
    for y in ys:
        for x in xs:
            window = np.ascontiguousarray(v1[:, y:y + wh, x:x + ww])
            with torch.inference_mode():
                out = model(torch.from_numpy(window)[None], torch.tensor([month]), torch.tensor([biome]))[0]
            eh, ew = window.shape[1:]
            num[:, y:y + eh, x:x + ew] += weight[:eh, :ew] * out.double().numpy()
            den[y:y + eh, x:x + ew] += weight[:eh, :ew]
    return num / den


# ---------------------------------------------------------------------------- placement and weights
@pytest.mark.parametrize("h,w", [(513, 1031), (700, 257), (257, 4099), (529, 17), (4096, 4096)])
def test_windows_cover_odd_tiles_flush_and_never_leave_them(h, w):
    grid = grid_for((4, h, w), WindowSettings(SIZE, OVERLAP, ABOVE), 16)
    covered = np.zeros((h, w), dtype=int)
    for k in range(grid.count):
        y, x = grid.origin(k)
        assert 0 <= y < h and 0 <= x < w and y % 16 == 0 and x % 16 == 0      # starts inside, on the patch grid
        part = grid.cut(np.empty((4, h, w)), k)
        assert part.shape == (4, min(grid.win_h, h - y), min(grid.win_w, w - x))
        assert grid.win_h - part.shape[1] < 16 and grid.win_w - part.shape[2] < 16   # at most the patch padding
        covered[y:y + part.shape[1], x:x + part.shape[2]] += 1
    assert covered.min() >= 1                                                        # no uncovered pixel
    for side, win, s in ((h, grid.win_h, grid.ys), (w, grid.win_w, grid.xs)):
        assert (list(s), win) == starts(side)
        assert s[0] == 0 and s[-1] + win == side + (-side) % 16                      # flush with both (padded) edges
        assert all(b - a <= SIZE - OVERLAP for a, b in zip(s, s[1:], strict=False))  # overlap >= 64 px


def test_a_tile_up_to_window_above_runs_whole():
    settings = WindowSettings(SIZE, OVERLAP, ABOVE)
    assert grid_for((4, 512, 512), settings, 16) is None          # padded 512: not above 512
    assert grid_for((4, 497, 500), settings, 16) is None          # padded 512 x 512
    assert grid_for((4, 513, 100), settings, 16).count == 3       # padded 528 > 512
    assert positions(100, 256, 192, 16) == (0,)


@pytest.mark.parametrize("h,w", [(513, 1031), (700, 257), (300, 2000), (20, 5000)])
def test_blend_weights_sum_to_one_so_a_per_pixel_function_survives_windowing(h, w):
    rng = np.random.default_rng(0)
    x = rng.random((4, h, w), dtype=np.float32)
    f = lambda a: np.sqrt(a) * 0.9 + 0.05 * a[::-1]               # a per-pixel function (bands mixed)  # noqa: E731
    grid = grid_for((4, h, w), WindowSettings(SIZE, OVERLAP, ABOVE), 16)
    tile = stage2.Tile("t", Path("t.npz"), x.copy(), {}, 6, 0)
    asm = Assembly(tile, grid, quality=True)
    windows = [f(grid.cut(x, k)) for k in range(grid.count)]     # cut before any row is final, as batches are
    done = [asm.add(k, y, 0.0, False) for k, y in enumerate(windows)]
    assert done == [False] * (grid.count - 1) + [True]
    out, q = asm.result()
    assert out is tile.array                                     # assembled in the input's own array
    np.testing.assert_allclose(out, f(x), atol=2e-6, rtol=0)
    want = tile_quality(x, f(x))
    assert q["ndvi_rmse"] == pytest.approx(want["ndvi_rmse"], rel=1e-6)
    assert q["edge_preservation"] == pytest.approx(want["edge_preservation"], abs=1e-6)


def test_windows_of_a_later_row_before_a_row_is_complete_are_refused():
    grid = grid_for((4, 700, 257), WindowSettings(SIZE, OVERLAP, ABOVE), 16)
    x = np.zeros((4, 700, 257), np.float32)
    asm = Assembly(stage2.Tile("t", Path("t.npz"), x, {}, 6, 0), grid, quality=False)
    asm.add(0, grid.cut(x, 0).copy(), 0.0, False)
    with pytest.raises(RuntimeError, match="arrived before window row 1 was complete"):
        asm.add(len(grid.xs), grid.cut(x, len(grid.xs)).copy(), 0.0, False)


@pytest.mark.parametrize("overrides,message", [
    (["window.overlap=256"], "window.overlap=256: use 0 up to window.size - 1 (255)"),
    (["window.size=8"], "window.size=8: windows need at least 16 px a side"),
    (["window.above=128"], "window.above=128 is below window.size=256"),
    (["nan_policy=drop"], "nan_policy='drop' is not one of fail, mask"),
])
def test_bad_window_settings_stop_the_run_before_anything_is_read(tmp_path, tiny_ckpt, capsys, overrides, message):
    make_tile(tmp_path / "in" / "a.npz", 32, 32)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("predict", overrides=[f"checkpoint={tiny_ckpt}", f"input_dir={tmp_path / 'in'}",
                                            f"output_dir={tmp_path / 'out'}", *CPU, *overrides])
    assert run(cfg) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("unit_batches", [2, 32])
def test_sampler_keeps_each_windowed_tile_on_one_rank_and_every_item_once(unit_batches):
    # one bucket: tile 0 in 10 windows, a small tile, tile 2 in 7 windows, 6 small tiles, tile 9 in 9 windows
    groups = [0] * 10 + [None] + [2] * 7 + [None] * 6 + [9] * 9
    for world in (1, 2, 3):
        per_rank = [SizeBucketBatchSampler(["k"] * len(groups), 4, r, world, groups, unit_batches).batches
                    for r in range(world)]
        seen = [i for batches in per_rank for b in batches for i in b]
        assert sorted(seen) == list(range(len(groups)))                  # every item once
        for g in (0, 2, 9):                                              # each windowed tile on one rank
            assert sum(any(groups[i] == g for b in batches for i in b) for batches in per_rank) == 1
        assert all(len(b) <= 4 for batches in per_rank for b in batches)
        # the batches do not depend on the number of ranks (so neither do the outputs)
        assert sorted(map(tuple, (b for batches in per_rank for b in batches))) == sorted(
            map(tuple, SizeBucketBatchSampler(["k"] * len(groups), 4, 0, 1, groups, unit_batches).batches))
    loads = [sum(map(len, SizeBucketBatchSampler(["k"] * len(groups), 4, r, 2, groups, 2).batches)) for r in (0, 1)]
    assert sum(loads) == 33 and max(loads) - min(loads) <= 11           # apart by at most one unit (tile 0's 11)


def test_a_tile_too_large_for_memory_fails_alone_naming_its_size_and_the_limit(tmp_path, monkeypatch):
    make_tile(tmp_path / "big.npz", 600, 300)
    grid = grid_for((4, 600, 300), WindowSettings(SIZE, OVERLAP, ABOVE), 16)
    monkeypatch.setattr("stage2.predict.windows.available_memory", lambda: 2**20)
    load = lambda p: load_tile(p, tmp_path, nan_policy="fail", input_scale=None, input_offset=None)   # noqa: E731
    source = WindowSource([tmp_path / "big.npz"], {0: grid}, load, lambda p: p.stem)
    got = [source.take(WindowRef(0, k, grid.count)) for k in range(grid.count)]
    assert isinstance(got[0], TileFailure) and got[1:] == [None] * (grid.count - 1)   # reported once
    assert "tile 600x300 px needs about 0.0 GiB for its array; 0.0 GiB of memory is available" in got[0].reason
    assert "split the tile" in got[0].hint


# ---------------------------------------------------------------------------- the whole run
@pytest.fixture(scope="module")
def windowed_run(tmp_path_factory, tiny_ckpt):
    """odd windowed tiles, a tile just under window.above and a small one, batch 3, no workers."""
    root = tmp_path_factory.mktemp("windows")
    inp = root / "in"
    tiles = {"tall": make_tile(inp / "tall.npz", 700, 257, seed=1, meta={"month": 4, "biome_code": 3}),
             "wide": make_tile(inp / "wide.npz", 513, 1031, seed=2),
             "under": make_tile(inp / "under.npz", 512, 512, seed=3),
             "small": make_tile(inp / "small.npz", 120, 120, seed=4)}
    r = run_cli([f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={root / 'out'}", *CPU, "batch_size=3",
                 "num_workers=0"], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, inp, tiles, r


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_a_windowed_tile_is_the_weighted_blend_of_its_windows_run_alone(windowed_run, tiny_model):
    root, inp, tiles, r = windowed_run
    out = root / "out"
    for name, (month, biome) in (("tall", (4, 3)), ("wide", (6, 0))):
        v2 = read_opt_v2(out / f"{name}.npz")
        assert v2.dtype == np.float32 and v2.shape == tiles[name].shape
        assert np.isfinite(v2).all() and v2.min() >= 0 and v2.max() <= 1
        expected = blend(tiny_model, tiles[name], month, biome)
        assert np.abs(v2 - expected).max() <= 1e-5, name
        windows = _json(out / f"{name}.json")["processing"]["windows"]
        (ys, wh), (xs, ww) = (starts(n) for n in tiles[name].shape[1:])
        assert windows == {"count": len(ys) * len(xs), "grid": [len(ys), len(xs)], "size": [wh, ww],
                           "overlap": OVERLAP, "refined_pixels": len(ys) * len(xs) * wh * ww}
    # a tile just under window.above runs whole, as before: the model on the whole tile
    under = read_opt_v2(out / "under.npz")
    with torch.inference_mode():
        alone = tiny_model(torch.from_numpy(tiles["under"])[None], torch.tensor([6]), torch.tensor([0]))[0].numpy()
    assert np.abs(under - alone).max() <= 1e-5
    assert _json(out / "under.json")["processing"]["windows"]["count"] == 1
    summary = _json(out / "_stage2_summary.json")
    assert (summary["found"], summary["processed"], summary["failed"]) == (4, 4, 0)   # a windowed tile counts once
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.{s}" for n in tiles for s in ("npz", "json")] + ["_stage2_summary.json", "_stage2_tiles.txt",
                                                                 "_stage2_stac"])


def test_progress_advances_through_a_large_tile_by_windows(windowed_run):
    root, inp, tiles, r = windowed_run
    files = sorted(inp.glob("*.npz"))
    data = TileDataModule(files=files, input_dir=inp, batch_size=3, num_workers=0, pin_memory=False, patch_size=16,
                          nan_policy="fail", window={"size": SIZE, "overlap": OVERLAP, "above": ABOVE},
                          input_scale=None, input_offset=0.0, clashes=(), require_georeference=False,
                          unseen_conditioning="unknown")
    assert data.tiles_on_rank(0, 1) == pytest.approx(4)
    assert sum(data.tiles_on_rank(r, 2) for r in range(2)) == pytest.approx(4)
    shown = [float(n) for n in re.findall(r"\| ([\d.]+)/4 \[", r.stdout)]
    assert any(0 < n % 1 for n in shown)                                 # fractions of a tile: windows
    assert shown == sorted(shown) and shown[-1] == 4


def test_results_do_not_depend_on_batch_size_other_tiles_or_workers(windowed_run, tiny_ckpt):
    root, inp, tiles, _ = windowed_run
    alone = root / "alone"
    for name in ("tall", "wide"):
        alone.mkdir(exist_ok=True)
        (alone / f"{name}.npz").write_bytes((inp / f"{name}.npz").read_bytes())
        if (inp / f"{name}.json").exists():
            (alone / f"{name}.json").write_bytes((inp / f"{name}.json").read_bytes())
    r = run_cli([f"checkpoint={tiny_ckpt}", f"input_dir={alone}", f"output_dir={root / 'out_alone'}", *CPU,
                 "batch_size=1", "num_workers=2"], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("tall", "wide"):
        a, b = read_opt_v2(root / "out" / f"{name}.npz"), read_opt_v2(root / "out_alone" / f"{name}.npz")
        assert np.abs(a - b).max() <= 1e-5, name


def _per_pixel(model: torch.nn.Module) -> torch.nn.Module:
    """The refiner made a pure per-pixel function: token features constant (to_pixels weight 0 and one
    bias per channel, whatever the pixel's place in its patch) and 1x1 decoder convolutions."""
    m = copy.deepcopy(model)
    p = m.patch_size
    with torch.no_grad():
        m.to_pixels.weight.zero_()
        bias = m.to_pixels.bias.view(-1, p * p)
        bias[:] = bias[:, :1].clone()
        for conv in (m.refine[0], m.refine[2]):
            centre = conv.weight[:, :, 1, 1].clone()
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = centre
    return m


def test_a_per_pixel_model_gives_the_same_result_windowed_and_whole(windowed_run, tiny_model, tmp_path):
    root, inp, tiles, _ = windowed_run
    model = _per_pixel(tiny_model)
    stage2.save_checkpoint(model, tmp_path / "per_pixel.pt")
    r = run_cli([f"checkpoint={tmp_path / 'per_pixel.pt'}", f"input_dir={inp}", f"output_dir={tmp_path / 'out'}",
                 *CPU, "batch_size=4"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, (month, biome) in (("tall", (4, 3)), ("wide", (6, 0))):
        with torch.inference_mode():
            whole = model(torch.from_numpy(tiles[name])[None], torch.tensor([month]), torch.tensor([biome]))[0].numpy()
        assert np.abs(whole - tiles[name]).mean() > 1e-3                 # the function does change the tile
        assert np.abs(read_opt_v2(tmp_path / "out" / f"{name}.npz") - whole).max() <= 1e-5, name


def test_a_kill_mid_tile_leaves_nothing_a_rerun_would_trust(tmp_path, tiny_ckpt):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_tile(inp / "a_small.npz", 64, 64, seed=1)
    make_tile(inp / "big.npz", 1536, 1536, seed=2)          # 32 x 32 windows of 64 px: hundreds of batches
    args = [f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={out}", *CPU, "batch_size=4",
            "window.size=64", "window.overlap=16", "window.above=128"]
    proc = subprocess.Popen([sys.executable, "-m", "stage2.predict", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seen, deadline = b"", time.monotonic() + 300
    try:
        while time.monotonic() < deadline:      # kill once the bar shows part of the big tile done
            if select.select([proc.stdout], [], [], 1.0)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
                done = [float(n) for n in re.findall(rb"\| ([\d.]+)/2 \[", seen)]
                if done and 1.0 < done[-1] < 2.0:
                    break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert done and 1.0 < done[-1] < 2.0, seen[-500:]
    assert not (out / "big.npz").exists() and not (out / "big.json").exists()
    r = run_cli(args, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = _json(out / "_stage2_summary.json")
    assert (summary["processed"], summary["skipped"]) == (1, 1)     # the small tile was trusted, the big one redone
    v2 = read_opt_v2(out / "big.npz")
    assert v2.shape == (4, 1536, 1536) and np.isfinite(v2).all()
    assert _json(out / "big.json")["processing"]["windows"]["count"] == 32 * 32
