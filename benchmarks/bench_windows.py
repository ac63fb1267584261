"""Tiles of any size (issue 14, docs/large-tiles.md): time per megapixel, what the overlap costs and buys, peak memory.

One run, one machine, one checkpoint (prithvi_eo_tiny, seeded as in tests/conftest.py), one batch size
and precision; every tile is made from real Sentinel-2 tiles (examples/, and ../shared/data/s2_real
where it exists), and every figure comes from `python -m stage2.predict` as a user runs it:
  speed    one 4096 x 4096 tile against 256 tiles of 256 x 256 (the same pixels), rounds alternated:
           seconds of the predict phase (log: 'trainer ready' to 'predict done': reading, windows,
           model, blending, quality, writing; start-up excluded) per megapixel of the tiles, and per
           megapixel the model refined (processing.windows.refined_pixels: the overlap counted);
  overlap  a 2048 x 2048 mosaic with window.overlap = 0, 32, 64, 128: time, windows, the seam ratio
           of tests/predict/test_real_tiles.py at window starts, ends and overlap middles (worst of
           the three), and the mean |opt_v2 - the model run on the whole tile at once|;
  memory   peak RSS (VmHWM) of predict over one 8192 x 8192 tile, against its input and output
           arrays (1 GiB each in float32), and of a run over one 256 px tile (the process itself).

usage: python benchmarks/bench_windows.py [--batch-size 4] [--precision 32] [--repeat 2]
       [--skip speed|overlap|memory ...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import ENV, REPO, SOURCES, _hwm_mib  # noqa: E402

sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "predict")]
from test_real_tiles import seam_ratio  # noqa: E402  (the tests' own seam statistic)

TILE = 256


def real_tiles() -> list[np.ndarray]:
    """Every real 256 px tile of the sources (examples/ first, so the figures do not need ../shared)."""
    out = []
    for src in [REPO / "examples" / "train_optical", *SOURCES]:
        for f in sorted(src.glob("*.npz")) if src.is_dir() else []:
            a = np.load(f)["opt_v1"]
            if a.shape == (4, TILE, TILE):
                out.append(a)
    return out


def mosaic(side: int, tiles: list[np.ndarray], offset: int = 0) -> np.ndarray:
    """A side x side mosaic of real tiles (cycled, flipped on alternate turns), cut from `offset` so
    that the tiles' own borders fall off the window grid."""
    n = math.ceil((side + offset) / TILE)
    out = np.empty((4, n * TILE, n * TILE), np.float32)
    for i in range(n * n):
        t = tiles[i % len(tiles)]
        t = t[:, ::-1] if (i // len(tiles)) % 2 else t
        r, c = divmod(i, n)
        out[:, r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = t
    return np.ascontiguousarray(out[:, offset:offset + side, offset:offset + side])


def save(folder: Path, name: str, arr: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{name}.npz", opt_v1=arr)
    (folder / f"{name}.json").write_text(json.dumps({"month": 6, "biome_code": 4}))


def checkpoint(path: Path) -> Path:
    """prithvi_eo_tiny with the tests' seeded weights (tests/conftest.py: tiny_model)."""
    import torch

    import stage2

    torch.manual_seed(0)
    model = stage2.build_model("prithvi_eo_tiny")
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    stage2.save_checkpoint(model.eval(), path)
    return path


def predict(ckpt: Path, inp: Path, out: Path, run_dir: Path, args: argparse.Namespace,
            extra: list[str] = ()) -> tuple[float, int]:
    """Predict phase seconds (from the run's log) and peak RSS in MiB of one predict process."""
    shutil.rmtree(out, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "stage2.predict", "hardware=cpu", f"checkpoint={ckpt}", f"input_dir={inp}",
           f"output_dir={out}", f"batch_size={args.batch_size}", f"precision={args.precision}",
           f"hydra.run.dir={run_dir}", *extra]
    with open(run_dir / "console.txt", "w") as console:     # a file, not a pipe: the bar writes a lot
        p = subprocess.Popen(cmd, cwd=run_dir, env=ENV, stdout=console, stderr=subprocess.STDOUT)
        peak = 0
        while p.poll() is None:
            peak = max(peak, _hwm_mib(p.pid) or 0)
            time.sleep(0.02)
    if p.returncode != 0:
        raise RuntimeError(f"predict exited {p.returncode}: {(run_dir / 'console.txt').read_text()[-3000:]}")
    log = (run_dir / "stage2_predict.log").read_text()
    ready = float(re.findall(r"trainer ready at ([\d.]+) s", log)[-1])
    done = float(re.findall(r"predict done at ([\d.]+) s", log)[-1])
    return done - ready, peak


def refined_pixels(out: Path) -> int:
    return sum(json.loads(p.read_text())["processing"]["windows"]["refined_pixels"] for p in out.glob("*.json")
               if not p.name.startswith("_"))


def bench_speed(ckpt: Path, work: Path, tiles: list[np.ndarray], args: argparse.Namespace) -> dict:
    big, small = work / "speed_big", work / "speed_small"
    save(big, "scene_4096", mosaic(4096, tiles))
    for i in range(4096 * 4096 // TILE**2):
        save(small, f"tile_{i:04d}", tiles[i % len(tiles)])
    best: dict[str, float] = {}
    for r in range(args.repeat):
        order = [("small", small), ("big", big)] if r % 2 == 0 else [("big", big), ("small", small)]
        for label, inp in order:
            out = work / f"out_{label}"
            secs, _ = predict(ckpt, inp, out, work / "runs" / f"speed_{label}_{r}", args)
            print(f"  round {r + 1}: {label}: {secs:.1f} s predict phase", flush=True)
            best[label] = min(best.get(label, math.inf), secs)
            best[f"{label}_refined"] = refined_pixels(out)
    mpx = 4096 * 4096 / 1e6
    res = {"small_s": best["small"], "big_s": best["big"], "tile_mpx": mpx,
           "big_refined_mpx": best["big_refined"] / 1e6, "small_refined_mpx": best["small_refined"] / 1e6}
    res["small_s_per_mpx"] = best["small"] / (best["small_refined"] / 1e6)
    res["big_s_per_tile_mpx"] = best["big"] / mpx
    res["big_s_per_refined_mpx"] = best["big"] / (best["big_refined"] / 1e6)
    res["ratio_per_refined_mpx"] = res["big_s_per_refined_mpx"] / res["small_s_per_mpx"]
    res["ratio_per_tile_mpx"] = res["big_s_per_tile_mpx"] / res["small_s_per_mpx"]
    return res


def seam_lines(side: int, overlap: int) -> dict[str, list[int]]:
    from stage2.predict.windows import WindowSettings, grid_for

    g = grid_for((4, side, side), WindowSettings(TILE, overlap, 512), 16)
    s = list(g.ys)
    return {"starts": [a for a in s if a > 0], "ends": [a + g.win_h for a in s if a + g.win_h < side],
            "middles": [(a + g.win_h + b) // 2 for a, b in zip(s, s[1:], strict=False)]}


def bench_overlap(ckpt: Path, work: Path, tiles: list[np.ndarray], args: argparse.Namespace) -> list[dict]:
    import torch

    import stage2

    side, offset = 2048, 100
    v1 = mosaic(side, tiles, offset)
    inp = work / "overlap_in"
    save(inp, "scene_2048", v1)
    with torch.inference_mode():
        whole = stage2.load_model(ckpt)(torch.from_numpy(v1)[None], torch.tensor([6]), torch.tensor([4]))[0].numpy()
    avoid = [b - offset for b in range(TILE, side + offset, TILE) if b > offset]   # the mosaic's own borders
    rows = []
    for overlap in (0, 32, 64, 128):
        out = work / f"overlap_out_{overlap}"
        secs, _ = predict(ckpt, inp, out, work / "runs" / f"overlap_{overlap}", args, [f"window.overlap={overlap}"])
        v2 = stage2.read_output(out / "scene_2048.npz").layers["opt_v2"]
        js = json.loads((out / "scene_2048.json").read_text())["processing"]["windows"]
        ratios = {k: seam_ratio(v1, v2, lines, avoid) for k, lines in seam_lines(side, overlap).items() if lines}
        rows.append({"overlap": overlap, "windows": js["count"], "refined_over_tile": js["refined_pixels"] / side**2,
                     "predict_s": secs, "seam_ratio_worst": max(ratios.values()),
                     "seam_ratios": ratios, "mean_abs_vs_whole": float(np.abs(v2 - whole).mean()),
                     "mean_refinement": float(np.abs(whole - v1).mean())})
        print(f"  overlap {overlap}: {rows[-1]}", flush=True)
    return rows


def bench_memory(ckpt: Path, work: Path, tiles: list[np.ndarray], args: argparse.Namespace) -> dict:
    one, big = work / "mem_one", work / "mem_big"
    save(one, "tile", tiles[0])
    save(big, "scene_8192", mosaic(8192, tiles))
    _, base = predict(ckpt, one, work / "mem_out_one", work / "runs" / "mem_one", args)
    secs, peak = predict(ckpt, big, work / "mem_out_big", work / "runs" / "mem_big", args)
    arrays = 2 * 4 * 8192 * 8192 * 4 / 2**20
    return {"peak_rss_mib": peak, "one_small_tile_rss_mib": base, "input_plus_output_mib": arrays,
            "peak_minus_arrays_mib": peak - arrays, "target_mib": arrays + 1.5e9 / 2**20, "predict_s": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--precision", default="32")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of the speed comparison; best of each is kept")
    ap.add_argument("--skip", action="append", default=[], choices=["speed", "overlap", "memory"])
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="stage2_bench_windows_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    tiles = real_tiles()
    ckpt = checkpoint(work / "tiny.pt")
    res: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "load_before": os.getloadavg(),
                 "batch_size": args.batch_size, "precision": args.precision, "real_tiles": len(tiles)}
    for name, fn in (("speed", bench_speed), ("overlap", bench_overlap), ("memory", bench_memory)):
        if name not in args.skip:
            print(f"{name} ...", flush=True)
            res[name] = fn(ckpt, work, tiles, args)
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
