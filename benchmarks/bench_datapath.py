"""The data path's ceiling: the predict pipeline with the model replaced by an identity.

Everything else is the real run, in-process through the composed conf/predict.yaml: discovery, reading
and validating each tile, padding and collation, the size-bucketing sampler, DataLoader workers, the
writer (atomic NPZ then JSON), the change statistics and the per-tile quality metrics. What it prints:

- per size, the per-metric costs of the quality metrics (ms per tile, docs/usage.md#quality) in their reference form
  (`stage2.quality.reference_*`, the definition) and in the CPU form the writer uses, measured side
  by side on the same real tiles, with the largest difference between the two;
- per size and number of DataLoader workers and writer threads, the steady tiles/s with quality on,
  off and on in its reference form, side by side (the modes alternate within each round), and that
  figure per core used, so a GPU user knows how many cores keep a GPU busy. Without DataLoader
  workers the process does all the work, and the same steady span is also measured in its CPU time
  (tiles per CPU second): the figure other jobs on shared cores change least. With quality on, the
  median thread CPU time of the writer's quality call per tile (in the pipeline, caches as they are).

usage: python benchmarks/bench_datapath.py [--sizes 120 256] [--count 200] [--workers 0 1 2]
       [--writer-threads 0 1 2] [--batch-size 16] [--quality on off reference] [--repeat 2]
       [--metric-rounds 7] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import make_tiles  # noqa: E402  (the same real Sentinel-2 crops as bench_predict)

QUALITY_MODES = ("on", "off", "reference")


class Identity(torch.nn.Module):
    """Stands in for Stage2Refiner: same interface, returns its input (the pipeline still crops and clips)."""

    patch_size = 16
    config = {"name": "identity"}
    conditioning = None         # no record of trained months and biomes (docs/architecture.md#model)

    def forward_padded(self, x: torch.Tensor, month: torch.Tensor, biome: torch.Tensor) -> torch.Tensor:
        return x.clone()


def compose(overrides: list[str], run_dir: Path):
    """conf/predict.yaml with `overrides`, with the Hydra state an in-process run needs."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    from stage2 import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("predict", overrides=overrides, return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@contextlib.contextmanager
def quality_form(mode: str, spent: list[float]):
    """The writer's `tile_quality` (looked up at each call) in the form of `mode` (the reference for
    'reference'), timed: each call's thread CPU time is appended to `spent`."""
    from stage2 import quality

    fast = quality.tile_quality
    form = quality.reference_tile_quality if mode == "reference" else fast

    def timed(*args, **kwargs):
        t = time.thread_time()
        out = form(*args, **kwargs)
        spent.append(time.thread_time() - t)
        return out

    quality.tile_quality = timed
    try:
        yield
    finally:
        quality.tile_quality = fast


@contextlib.contextmanager
def cpu_marks(marks: list[tuple[int, float]]):
    """Appends (tiles so far, process CPU time) after each batch the writer takes."""
    from stage2.predict.writer import TileWriter

    real = TileWriter.write_on_batch_end

    def marked(self, *args, **kwargs):
        real(self, *args, **kwargs)
        marks.append((sum(n for _, n in self.batch_marks), time.process_time()))

    TileWriter.write_on_batch_end = marked
    try:
        yield
    finally:
        TileWriter.write_on_batch_end = real


def cpu_steady(marks: list[tuple[int, float]]) -> float | None:
    """Tiles per CPU second after the first two batches (the span the summary's steady figure uses)."""
    if len(marks) < 3 or marks[-1][1] <= marks[1][1]:
        return None
    return (marks[-1][0] - marks[1][0]) / (marks[-1][1] - marks[1][1])


def one_run(tiles: Path, out: Path, ckpt: Path, workers: int, writers: int, batch: int,
            mode: str) -> tuple[float, float, float | None, float | None]:
    """(steady tiles/s as the summary measures it, whole-run tiles/s, steady tiles per CPU second of the
    process, median ms of the quality metrics per tile) of one in-process run, identity model."""
    from stage2.predict import app

    shutil.rmtree(out, ignore_errors=True)
    cfg = compose([f"checkpoint={ckpt}", f"input_dir={tiles}", f"output_dir={out}", "hardware=cpu",
                   f"num_workers={workers}", f"writer_threads={writers}", f"batch_size={batch}",
                   f"quality={str(mode != 'off').lower()}", "tta=none", "precision=32",
                   "trainer.enable_progress_bar=false"],
                  out.parent / "run")
    marks: list[tuple[int, float]] = []
    spent: list[float] = []
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), quality_form(mode, spent), cpu_marks(marks):
        code = app.run(cfg)
    wall = time.perf_counter() - t
    if code != 0:
        raise RuntimeError(f"predict exited {code}")
    summary = json.loads((out / "_stage2_summary.json").read_text())
    quality_ms = 1e3 * float(np.median(spent)) if spent else None
    return summary["tiles_per_s"], summary["processed"] / wall, cpu_steady(marks), quality_ms


def metric_forms() -> dict[str, tuple[Callable, Callable]]:
    """Per metric: (reference form, CPU form), each called as f(v1, v2)."""
    from stage2 import quality as q

    return {"Sobel magnitude, one band": (lambda a, b: q.sobel_magnitude(a[q.NIR]),
                                          lambda a, b: q._sobel_fast(a[q.NIR])),
            "ndvi_rmse": (q.reference_ndvi_rmse, q.ndvi_rmse),
            "edge_preservation": (q.reference_edge_preservation, q.edge_preservation),
            "tile_quality (both)": (q.reference_tile_quality, q.tile_quality)}


def metric_costs(tiles: Path, rounds: int, distinct: int = 32) -> list[dict]:
    """ms per tile of each metric's two forms, alternated call by call over `distinct` real tiles.

    Timed with the calling thread's CPU time (time.thread_time), so that other jobs on shared cores do
    not count; each figure is the best round. The tiles are distinct (about 2 MiB per pair), so they
    come from memory as in the pipeline, not from the cache of the previous call. v2 is v1 with
    reflectance noise of 0.005, as a refinement changes a tile.
    """
    from stage2 import quality as q

    rng = np.random.default_rng(0)
    pairs = []
    for f in sorted(tiles.glob("*.npz"))[:distinct]:
        v1 = np.load(f)["opt_v1"]
        pairs.append((v1, np.clip(v1 + rng.normal(0, 0.005, v1.shape).astype(np.float32), 0, 1)))
    rows = []
    for name, (old, new) in metric_forms().items():
        best = [float("inf"), float("inf")]
        for _ in range(rounds):
            spent = [0.0, 0.0]
            for v1, v2 in pairs:
                for i, f in enumerate((old, new)):
                    t = time.thread_time()
                    f(v1, v2)
                    spent[i] += time.thread_time() - t
            best = [min(b, s / len(pairs)) for b, s in zip(best, spent, strict=True)]
        rows.append({"metric": name, "reference_ms": 1e3 * best[0], "cpu_form_ms": 1e3 * best[1]})
    diff = 0.0
    for v1, v2 in pairs:
        a, b = q.reference_tile_quality(v1, v2), q.tile_quality(v1, v2)
        diff = max([diff] + [abs(a[k] - b[k]) for k in a if a[k] is not None and b[k] is not None])
    rows.append({"metric": "largest |reference - CPU form| over the tiles", "value": diff})
    return rows


def collation_costs(tiles: Path, rounds: int, batch: int) -> dict[str, float]:
    """ms per tile to collate a batch of `batch` real tiles: torch.cat of tiles padded by torch, against
    stage2's NumPy stack_padded (the same values), alternated batch by batch; wall time (torch.cat uses
    torch's threads, which a thread CPU clock would not see), median of `rounds`."""
    from stage2.model import pad_to_multiple
    from stage2.predict.data import stack_padded

    arrays = [np.load(f)["opt_v1"] for f in sorted(tiles.glob("*.npz"))[:batch]]
    spent: dict[str, list[float]] = {"torch.cat": [], "stack_padded": []}
    for _ in range(rounds):
        t = time.perf_counter()
        torch.cat([pad_to_multiple(torch.from_numpy(a)[None], 16) for a in arrays])
        spent["torch.cat"].append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.from_numpy(stack_padded(arrays, 16))
        spent["stack_padded"].append(time.perf_counter() - t)
    return {k: 1e3 * float(np.median(v)) / len(arrays) for k, v in spent.items()}


def print_costs(size: int, rows: list[dict]) -> None:
    print(f"  {size} px, ms per tile (best of rounds, thread CPU time)   reference   CPU form   ratio")
    for r in rows:
        if "value" in r:
            print(f"    {r['metric']:<47s} {r['value']:.1e}")
            continue
        ratio = r["reference_ms"] / r["cpu_form_ms"]
        print(f"    {r['metric']:<47s} {r['reference_ms']:9.3f}  {r['cpu_form_ms']:9.3f}  {ratio:6.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[120, 256])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--writer-threads", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quality", nargs="+", choices=QUALITY_MODES, default=list(QUALITY_MODES),
                    help="pipeline modes, alternated within each round: quality on (the CPU form), off, "
                         "and on in the reference form")
    ap.add_argument("--repeat", type=int, default=2, help="rounds per setting; each figure is the best")
    ap.add_argument("--metric-rounds", type=int, default=7, help="rounds of the per-metric costs (0: skip)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from stage2.predict import app

    app.load_checked_model = lambda checkpoint: Identity()      # the only change to the real pipeline
    work = args.workdir or Path(tempfile.mkdtemp(prefix="stage2_datapath_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "identity.pt"
    ckpt.write_bytes(b"")                                        # plan() only checks that it exists
    cores = os.cpu_count() or 1
    print(f"data path, identity model: {args.count} tiles per size, batch {args.batch_size}, tta none, "
          f"{cores} CPUs; best of {args.repeat} rounds, quality modes {' / '.join(args.quality)} alternated")
    results: dict[str, list] = {"metric_costs": [], "pipeline": []}
    for size in args.sizes:
        tiles = work / f"tiles_{size}"
        shutil.rmtree(tiles, ignore_errors=True)
        make_tiles(tiles, size, args.count)
        if args.metric_rounds > 0:
            rows = metric_costs(tiles, args.metric_rounds)
            print_costs(size, rows)
            results["metric_costs"].append({"size": size, "rows": rows})
            coll = collation_costs(tiles, max(args.metric_rounds, 5), args.batch_size)
            print(f"    collation, ms per tile of a batch of {args.batch_size} (median, wall)   torch.cat "
                  f"{coll['torch.cat']:.3f}   stack_padded {coll['stack_padded']:.3f}   "
                  f"{coll['torch.cat'] / coll['stack_padded']:.2f}x")
            results["collation"] = results.get("collation", []) + [{"size": size, **coll}]
        for w in args.workers:
            for t in args.writer_threads:
                runs: dict[str, list[tuple[float, float, float | None, float | None]]] = {m: [] for m in args.quality}
                for _ in range(args.repeat):
                    for m in args.quality:
                        runs[m].append(one_run(tiles, work / "out", ckpt, w, t, args.batch_size, m))
                used = min(cores, 1 + w + t)        # main process + workers + writer threads, at most the CPUs
                row = {"size": size, "workers": w, "writer_threads": t, "cores_used": used}
                for m, r in runs.items():
                    cpu = [x[2] for x in r if x[2] is not None] if w == 0 else []
                    q_ms = [x[3] for x in r if x[3] is not None]
                    row[m] = {"steady_tiles_per_s": max(x[0] for x in r), "whole_run_tiles_per_s": max(x[1] for x in r),
                              "steady_tiles_per_s_per_core": max(x[0] for x in r) / used,
                              "steady_tiles_per_cpu_s": max(cpu) if cpu else None,
                              "quality_ms_per_tile": min(q_ms) if q_ms else None,
                              "rounds_steady": [x[0] for x in r], "rounds_per_cpu_s": cpu, "rounds_quality_ms": q_ms}
                results["pipeline"].append(row)
                print(f"  {size:4d} px  workers {w}  writer threads {t}  ({used} cores used)")
                for m in args.quality:
                    cpu, q_ms = row[m]["steady_tiles_per_cpu_s"], row[m]["quality_ms_per_tile"]
                    print(f"      quality {m:<9s}  steady {row[m]['steady_tiles_per_s']:7.1f} tiles/s, "
                          f"{row[m]['steady_tiles_per_s_per_core']:6.1f} per core"
                          + (f";  {cpu:6.1f} tiles per CPU second" if cpu else "")
                          + (f";  quality {q_ms:.3f} ms per tile" if q_ms else ""), flush=True)
    (work / "datapath_result.json").write_text(json.dumps(results, indent=2))
    print(f"results: {work / 'datapath_result.json'}")


if __name__ == "__main__":
    main()
