"""Steady tiles/s of `tta=none`, `flips` and `d4`, side by side in one process (docs/confidence.md#cost).

Runs `Stage2Module.predict_step` (the pipeline's forward with its TTA passes: transforms, one batched
forward, the inverse transforms, mean and std, the copy back to numpy) over batches already in memory,
for each precision. The modes take turns batch by batch, each on the same work (8 passes a tile), and
each figure is the median of `--repeat` rounds, because a shared machine drifts within seconds. The
passes cost nothing of their own when `flips` takes 4x and `d4` 8x the time of `none` (targets: at
most 4.3x and 8.5x).

Then the host's share per tile: the `confidence` statistics (std mean and 95th percentile per band, the
mean change) and writing the std beside opt_v2 in the NPZ, against the plain NPZ write.

usage: python benchmarks/bench_tta.py [--model prithvi_eo_tiny] [--size 256] [--batch 4] [--precisions 32 auto]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import numpy as np

MODES = ("none", "flips", "d4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="prithvi_eo_tiny")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tiles", type=int, default=8, help="tiles per round")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--streams", type=int, default=2, help="cpu_streams (the cpu profile's 2)")
    ap.add_argument("--precisions", nargs="+", default=["32", "auto"],
                    help="32, or auto: bf16 autocast where the CPU computes bf16 natively, as predict runs it")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    import stage2
    from stage2.predict import module as module_
    from stage2.predict.confidence import TTA_PASSES
    from stage2.predict.data import collate
    from stage2.runtime import keep_freed_memory, resolve_precision
    from stage2.tiles import Tile

    keep_freed_memory()         # as predict does on a CPU (Stage2Module.on_predict_start)

    rng = np.random.default_rng(0)
    tiles = [Tile(f"t{i}", None, rng.random((4, args.size, args.size), dtype=np.float32), {}, 6, 0)
             for i in range(args.tiles)]
    print(f"{args.model}, {args.size} px, batch {args.batch}, cpu_streams={args.streams}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; median of {args.repeat} rounds")
    for precision in args.precisions:
        resolved = resolve_precision(precision, False, "32-true")
        bf16 = resolved == "bf16-mixed"
        torch.manual_seed(0)
        model = stage2.build_model(args.model)
        if bf16:        # as the pipeline runs bf16 on a CPU: weights cast once, autocast for the rest
            module_.cast_matmul_weights(model, torch.bfloat16)
        batches = [collate(tiles[i:i + args.batch], model.patch_size) for i in range(0, len(tiles), args.batch)]
        modules = {m: module_.Stage2Module(model, compile=False, cpu_streams=args.streams, tta=m) for m in MODES}
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for m in modules.values():
                m.predict_step(batches[0], 0)        # warm-up: oneDNN primitives, thread pools
            for r in range(args.repeat):
                spent = dict.fromkeys(MODES, 0.0)
                for i, b in enumerate(batches):
                    # Each mode runs blocks of the same work (8 passes a tile: none 8 times, flips twice,
                    # d4 once), taking turns: on a shared machine a short block would catch the quiet
                    # moments a long one averages over, and drift hits every mode alike.
                    order = MODES[(i + r) % 3:] + MODES[:(i + r) % 3]
                    for mode in order:
                        t = time.perf_counter()
                        for _ in range(8 // TTA_PASSES[mode]):
                            modules[mode].predict_step(b, i)
                        spent[mode] += time.perf_counter() - t
                for mode in MODES:
                    rates[mode].append(8 // TTA_PASSES[mode] * len(tiles) / spent[mode])
        for m in modules.values():
            m.on_predict_end()
        # each round's ratio, then their median: the three modes of one round ran side by side
        ratios = {mode: statistics.median(n / x for n, x in zip(rates["none"], rates[mode], strict=True))
                  for mode in MODES[1:]}
        figures = "   ".join(f"{mode} {statistics.median(rates[mode]):6.2f}" for mode in MODES)
        print(f"  precision {precision} ({resolved}): tiles/s {figures}   time vs none: "
              + "   ".join(f"{mode} x{ratios[mode]:.2f}" for mode in MODES[1:]))
    host_share(args.size)


def host_share(size: int, repeat: int = 20) -> None:
    """ms per tile of the writer's extra work with a std: the statistics, and the NPZ with two layers."""
    from stage2.predict.confidence import ChangeSum, confidence

    rng = np.random.default_rng(1)
    v1, v2 = (rng.random((4, size, size), dtype=np.float32) for _ in range(2))
    std = rng.random((4, size, size), dtype=np.float32) * 0.01

    def best(fn) -> float:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * min(times)

    def stats(with_std: bool) -> None:
        change = ChangeSum()
        change.add(v1, v2)
        confidence(change, std if with_std else None, None)

    plain = best(lambda: np.savez(io.BytesIO(), opt_v2=v2))
    both = best(lambda: np.savez(io.BytesIO(), opt_v2=v2, opt_v2_std=std))
    print(f"  host, per {size} px tile: confidence {best(lambda: stats(True)):.2f} ms (change alone, tta=none: "
          f"{best(lambda: stats(False)):.2f} ms); NPZ in memory {plain:.2f} ms, with the std {both:.2f} ms")


if __name__ == "__main__":
    main()
