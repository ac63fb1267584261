"""Side-by-side speed and memory of the stage2 pipeline against the bare model (issue 7).

One run, same machine, checkpoint, tiles, batch size and precision:
  bare      stage2.load_model(ckpt) forward over batches already in memory (tiles/s)
  pipeline  `python -m stage2.predict` as a user runs it: steady tiles/s (summary) and process wall time
  naive     the guide's loop (benchmarks/naive_loop.py) as a whole process
  rerun     the same predict command over the finished output dir
  memory    peak RSS of predict over 200 and 2,000 small tiles (tiny model)
and the ratios pipeline_steady/bare, naive_wall/pipeline_wall, rss_2000/rss_200.

usage: python benchmarks/bench_predict.py [--model prithvi_eo_v1_100] [--size 120] [--count 64] [--batch-size 4]
       [--set KEY=VALUE ...]
Forward tiles/s per batch size, with and without cpu_streams: benchmarks/bench_batch.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO.parent / "shared" / "data" / "s2_real", REPO / "examples" / "demo_aoi"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def make_tiles(dst: Path, size: int, count: int, seed: int = 0) -> str:
    """`count` real Sentinel-2 crops of size x size (with sidecars), from the first source found."""
    dst.mkdir(parents=True, exist_ok=True)
    src = next((s for s in SOURCES if s.is_dir() and any(s.glob("*.npz"))), None)
    crops: list[tuple[np.ndarray, dict]] = []
    if src is not None:
        for f in sorted(src.glob("*.npz")):
            arr = np.load(f)["opt_v1"]
            side = f.with_suffix(".json")
            meta = json.loads(side.read_text()) if side.exists() else {}
            for r in range(0, arr.shape[1] - size + 1, size):
                for c in range(0, arr.shape[2] - size + 1, size):
                    crops.append((arr[:, r:r + size, c:c + size], meta))
    origin = f"real tiles from {src}" if crops else "generated tiles"
    rng = np.random.default_rng(seed)
    for i in range(count):
        if crops:
            arr, meta = crops[i % len(crops)]
        else:
            arr, meta = rng.random((4, size, size), dtype=np.float32), {"month": 6}
        np.savez(dst / f"tile_{i:05d}.npz", opt_v1=np.ascontiguousarray(arr, dtype=np.float32))
        (dst / f"tile_{i:05d}.json").write_text(json.dumps({**meta, "tile_id": f"tile_{i:05d}"}))
    return origin


def _hwm_mib(pid: int) -> int | None:
    """VmHWM (peak resident memory) of a live process, in MiB, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def run_process(cmd: list[str], cwd: Path) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall seconds and peak RSS (MiB) of one child process.

    Peak RSS is the child's own VmHWM, polled while it runs (getrusage's ru_maxrss would report
    this benchmark's own, larger peak, which a child inherits across fork and exec).
    """
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:
        peak = max(peak, _hwm_mib(p.pid) or 0)
        time.sleep(0.02)
    wall = time.perf_counter() - t
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {p.returncode}:\n{err[-3000:]}")
    return wall, peak, subprocess.CompletedProcess(cmd, p.returncode, out, err)


HARDWARE = "cpu"
OVERRIDES: list[str] = []   # --set KEY=VALUE: extra Hydra overrides for every predict command


def predict_cmd(ckpt: Path, inp: Path, out: Path, batch: int, precision: str, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "stage2.predict", f"hardware={HARDWARE}", f"checkpoint={ckpt}", f"input_dir={inp}",
            f"output_dir={out}", f"batch_size={batch}", f"precision={precision}", *OVERRIDES, *extra]


def bare_tiles_per_s(ckpt: Path, tiles_dir: Path, batch: int, precision: str) -> float:
    """The ceiling: the checkpoint's forward over batches already in memory, after one warm-up batch."""
    import torch

    import stage2
    from stage2.model import pad_to_multiple

    device = "cuda" if HARDWARE != "cpu" and torch.cuda.is_available() else "cpu"
    model = stage2.load_model(ckpt, device=device)
    arrays = [np.load(f)["opt_v1"] for f in sorted(tiles_dir.glob("*.npz"))]
    padded = [pad_to_multiple(torch.from_numpy(a[None].astype(np.float32)), model.patch_size) for a in arrays]
    batches = [torch.cat(padded[i:i + batch]) for i in range(0, len(padded), batch)]
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    month = lambda n: torch.full((n,), 6, device=device)  # noqa: E731
    biome = lambda n: torch.zeros(n, dtype=torch.long, device=device)  # noqa: E731
    with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        for x in batches[:1]:
            model.forward_padded(x.to(device), month(len(x)), biome(len(x))).float().cpu()
        t = time.perf_counter()
        for x in batches:   # host-to-device copy and the copy back included, as in the pipeline
            model.forward_padded(x.to(device), month(len(x)), biome(len(x))).float().cpu().numpy()
        return len(arrays) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="prithvi_eo_v1_100")
    ap.add_argument("--size", type=int, default=120)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--precision", default="32")
    ap.add_argument("--rss-counts", type=int, nargs=2, default=[200, 2000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--no-rss", action="store_true", help="skip the memory runs")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of bare/pipeline/naive; best of each is kept")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--hardware", default="cpu", help="predict's hardware profile (cpu, lowvr, highvr)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for the predict runs, e.g. --set cpu_streams=1 (repeatable)")
    args = ap.parse_args()
    global HARDWARE
    HARDWARE = args.hardware
    OVERRIDES.extend(args.set)

    import torch

    import stage2

    work = args.workdir or Path(tempfile.mkdtemp(prefix="stage2_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ckpt = stage2.save_checkpoint(stage2.build_model(args.model), work / f"{args.model}.pt")
    tiles = work / f"tiles_{args.size}"
    shutil.rmtree(tiles, ignore_errors=True)
    origin = make_tiles(tiles, args.size, args.count)

    res: dict[str, float] = {}
    # A shared machine drifts by 20 % within minutes: each round measures bare, pipeline and naive
    # back to back, and each figure is the best of its rounds (--repeat).
    out, naive_out = work / "out_pipeline", work / "out_naive"
    bare, steady, pipe_wall, naive_wall = [], [], [], []
    for _ in range(args.repeat):
        bare.append(bare_tiles_per_s(ckpt, tiles, args.batch_size, args.precision))
        shutil.rmtree(out, ignore_errors=True)
        pipe_wall.append(run_process(predict_cmd(ckpt, tiles, out, args.batch_size, args.precision), work)[0])
        steady.append(json.loads((out / "_stage2_summary.json").read_text())["tiles_per_s"])
        shutil.rmtree(naive_out, ignore_errors=True)
        naive_wall.append(run_process([sys.executable, str(REPO / "benchmarks" / "naive_loop.py"), str(ckpt),
                                       str(tiles), str(naive_out)], work)[0])
    rounds = {"bare_tiles_per_s": bare, "pipeline_steady_tiles_per_s": steady, "pipeline_wall_s": pipe_wall,
              "naive_wall_s": naive_wall}
    res["bare_tiles_per_s"], res["pipeline_steady_tiles_per_s"] = max(bare), max(steady)
    res["pipeline_wall_s"], res["naive_wall_s"] = min(pipe_wall), min(naive_wall)
    res["rerun_wall_s"], _, rr = run_process(predict_cmd(ckpt, tiles, out, args.batch_size, args.precision), work)
    assert "nothing to do" in rr.stdout
    res["max_abs_diff_pipeline_vs_naive"] = max(
        float(np.abs(np.load(out / f.name)["opt_v2"] - np.load(f)["opt_v2"]).max()) for f in naive_out.glob("*.npz"))

    if not args.no_rss:
        torch.manual_seed(0)
        tiny = stage2.save_checkpoint(stage2.build_model("prithvi_eo_tiny"), work / "tiny.pt")
        for n in args.rss_counts:
            d = work / f"rss_{n}"
            shutil.rmtree(d, ignore_errors=True)
            make_tiles(d, 32, n)
            o = work / f"rss_out_{n}"
            shutil.rmtree(o, ignore_errors=True)
            _, res[f"rss_{n}_mib"], _ = run_process(predict_cmd(tiny, d, o, args.batch_size, "32", ["num_workers=0"]),
                                                    work)

    res["pipeline_steady_over_bare"] = res["pipeline_steady_tiles_per_s"] / res["bare_tiles_per_s"]
    res["naive_wall_over_pipeline_wall"] = res["naive_wall_s"] / res["pipeline_wall_s"]
    if not args.no_rss:
        small, large = args.rss_counts
        res[f"rss_{large}_over_rss_{small}"] = res[f"rss_{large}_mib"] / res[f"rss_{small}_mib"]

    print(f"\nstage2 benchmark: {args.model}, {args.count} tiles of {args.size} px ({origin}), batch "
          f"{args.batch_size}, precision {args.precision}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    width = max(map(len, res))
    for k, v in res.items():
        each = f"   rounds: {', '.join(f'{x:.2f}' for x in rounds[k])}" if k in rounds else ""
        print(f"  {k:<{width}}  {v:10.3f}{each}")
    (work / "bench_result.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "results": res, "rounds": rounds}, indent=2))
    print(f"results: {work / 'bench_result.json'}")


if __name__ == "__main__":
    main()
