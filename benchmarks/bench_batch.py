"""Forward tiles/s per batch size and `cpu_streams`, in one process (the table in benchmarks/README.md).

Runs `Stage2Module.predict_step` (the pipeline's forward: padding, the model, the copy back to numpy)
over batches already in memory, for each batch size with one forward per batch (`cpu_streams=1`) and
with the batch split into concurrent forwards (`cpu_streams=N`). Settings alternate inside each
round and each figure is the best of `--repeat` rounds, because a shared machine drifts within minutes.
A one-tile batch always runs as one forward, so its streams figure repeats the plain one.

usage: python benchmarks/bench_batch.py [--model prithvi_eo_v1_100] [--sizes 128 256] [--batches 1 2 4 8]
       [--precision 32|bf16]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="prithvi_eo_v1_100")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--streams", type=int, default=2, help="cpu_streams to compare with one forward")
    ap.add_argument("--tiles", type=int, default=0, help="tiles per round (default: 32 at <= 128 px, else 16)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--precision", choices=["32", "bf16"], default="32",
                    help="bf16: under CPU bf16 autocast, as precision=bf16-mixed runs predict_step")
    ap.add_argument("--min-tokens", type=int, default=None,
                    help="override stage2.predict.module.STREAM_MIN_TOKENS (to re-tune the threshold on another CPU)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    import stage2
    from stage2.predict import module as module_
    from stage2.predict.data import collate
    from stage2.predict.module import Stage2Module
    from stage2.tiles import Tile

    if args.min_tokens is not None:
        module_.STREAM_MIN_TOKENS = args.min_tokens

    torch.manual_seed(0)
    model = stage2.build_model(args.model)
    rng = np.random.default_rng(0)
    bf16 = args.precision == "bf16"
    print(f"{args.model}, {'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs; tiles/s, best of {args.repeat}")
    for size in args.sizes:
        n = args.tiles or (32 if size <= 128 else 16)
        tiles = [Tile(f"t{i}", None, rng.random((4, size, size), dtype=np.float32), {}, 6, 0) for i in range(n)]
        for batch in args.batches:
            batches = [collate(tiles[i:i + batch], model.patch_size) for i in range(0, n, batch)]
            modules = {s: Stage2Module(model, compile=False, cpu_streams=s) for s in (1, args.streams)}
            best = dict.fromkeys(modules, 0.0)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for m in modules.values():
                    m.predict_step(batches[0], 0)        # warm-up: oneDNN primitives, thread pools
                for r in range(args.repeat):
                    # alternate which setting goes first: no order bias (warm caches, clock ramps)
                    for s, m in (list(modules.items()) if r % 2 == 0 else list(modules.items())[::-1]):
                        t = time.perf_counter()
                        for i, b in enumerate(batches):
                            m.predict_step(b, i)
                        best[s] = max(best[s], n / (time.perf_counter() - t))
            for m in modules.values():
                m.on_predict_end()
            print(f"  {size:4d} px  batch {batch:3d}   one forward {best[1]:7.2f}   "
                  f"cpu_streams={args.streams} {best[args.streams]:7.2f}   x{best[args.streams] / best[1]:.2f}")


if __name__ == "__main__":
    main()
