"""The data path's ceiling (issue 16): the predict pipeline with the model replaced by an identity.

Everything else is the real run, in-process through the composed conf/predict.yaml: discovery, reading
and validating each tile, padding and collation, the size-bucketing sampler, DataLoader workers, the
writer (atomic NPZ then JSON) and the per-tile quality metrics. What it prints is how many tiles per
second the CPU side can feed and write, per size and per number of DataLoader workers and writer
threads, and that figure per core used, so a GPU user knows how many cores keep a GPU busy.

usage: python benchmarks/bench_datapath.py [--sizes 120 256] [--count 200] [--workers 0 1 2]
       [--writer-threads 0 1 2] [--batch-size 16] [--no-quality] [--repeat 2]
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import make_tiles  # noqa: E402  (the same real Sentinel-2 crops as bench_predict)


class Identity(torch.nn.Module):
    """Stands in for Stage2Refiner: same interface, returns its input (the pipeline still crops and clips)."""

    patch_size = 16
    config = {"name": "identity"}
    conditioning = None         # no record of trained months and biomes (SPEC 6)

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


def one_run(tiles: Path, out: Path, ckpt: Path, workers: int, writers: int, batch: int,
            quality: bool) -> tuple[float, float]:
    """(steady tiles/s as the summary measures it, whole-run tiles/s) of one in-process run, identity model."""
    from stage2.predict import app

    shutil.rmtree(out, ignore_errors=True)
    cfg = compose([f"checkpoint={ckpt}", f"input_dir={tiles}", f"output_dir={out}", "hardware=cpu",
                   f"num_workers={workers}", f"writer_threads={writers}", f"batch_size={batch}",
                   f"quality={str(quality).lower()}", "precision=32", "trainer.enable_progress_bar=false"],
                  out.parent / "run")
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = app.run(cfg)
    wall = time.perf_counter() - t
    if code != 0:
        raise RuntimeError(f"predict exited {code}")
    summary = json.loads((out / "_stage2_summary.json").read_text())
    return summary["tiles_per_s"], summary["processed"] / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[120, 256])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--writer-threads", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs per setting")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from stage2.predict import app

    app.load_checked_model = lambda checkpoint: Identity()      # the only change to the real pipeline
    work = args.workdir or Path(tempfile.mkdtemp(prefix="stage2_datapath_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "identity.pt"
    ckpt.write_bytes(b"")                                        # plan() only checks that it exists
    cores = os.cpu_count() or 1
    print(f"data path, identity model: {args.count} tiles per size, batch {args.batch_size}, quality "
          f"{not args.no_quality}, {cores} CPUs; best of {args.repeat} runs")
    results = []
    for size in args.sizes:
        tiles = work / f"tiles_{size}"
        shutil.rmtree(tiles, ignore_errors=True)
        make_tiles(tiles, size, args.count)
        for w in args.workers:
            for t in args.writer_threads:
                runs = [one_run(tiles, work / "out", ckpt, w, t, args.batch_size, not args.no_quality)
                        for _ in range(args.repeat)]
                steady, whole = max(r[0] for r in runs), max(r[1] for r in runs)
                used = min(cores, 1 + w + t)        # main process + workers + writer threads, at most the CPUs
                results.append({"size": size, "workers": w, "writer_threads": t, "steady_tiles_per_s": steady,
                                "whole_run_tiles_per_s": whole, "cores_used": used,
                                "steady_tiles_per_s_per_core": steady / used})
                print(f"  {size:4d} px  workers {w}  writer threads {t}   steady {steady:7.1f} tiles/s "
                      f"({steady / used:6.1f} per core, {used} used)   whole run {whole:7.1f} tiles/s", flush=True)
    (work / "datapath_result.json").write_text(json.dumps(results, indent=2))
    print(f"results: {work / 'datapath_result.json'}")


if __name__ == "__main__":
    main()
