"""How much does bf16 autocast change the refined tiles? (issue 16, point 2)

Runs a checkpoint over real tiles twice, in exact fp32 and under CPU bf16 autocast (what
`precision=auto` picks on a CPU with native bf16), and prints per tile the maximum and mean absolute
difference of opt_v2 and the change of each quality metric (NDVI RMSE, edge preservation against
opt_v1; RMSE to the truth where a truth folder is given). With `--layers`, it also finds which layers
cause the largest difference: each top-level submodule is in turn kept in fp32 (autocast disabled
inside it) and the resulting maximum difference is printed.

usage: python benchmarks/bench_bf16_accuracy.py CHECKPOINT TILES_DIR [--truth DIR] [--layers]
(the demo: `make demo`, then CHECKPOINT=demo_out/refiner.pt TILES_DIR=demo_out/stage1 --truth examples/demo_aoi)
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import torch

import stage2
from stage2.quality import rmse, tile_quality
from stage2.tiles import discover, read_tile


def refine(model: torch.nn.Module, tile, bf16: bool) -> np.ndarray:
    x = torch.from_numpy(tile.array)[None]
    m, b = torch.tensor([tile.month]), torch.tensor([tile.biome])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(x, m, b)[0].float().numpy()


@contextlib.contextmanager
def fp32_inside(module: torch.nn.Module):
    """Autocast off inside `module` (its inputs cast back to fp32): that layer runs in fp32."""
    ctx = torch.autocast("cpu", enabled=False)

    def enter(_, args):
        ctx.__enter__()
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def leave(*_):
        ctx.__exit__(None, None, None)

    hooks = (module.register_forward_pre_hook(enter), module.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers the forward calls, in order (the encoder's parts are called one by one)."""
    enc = model.encoder
    return ([("patch_embed", enc.patch_embed)] + [(f"block{i}", b) for i, b in enumerate(enc.blocks)]
            + [("norm", enc.norm), ("to_pixels", model.to_pixels), ("refine", model.refine)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("tiles", type=Path)
    ap.add_argument("--truth", type=Path, default=None)
    ap.add_argument("--layers", action="store_true")
    args = ap.parse_args()
    model = stage2.load_model(args.checkpoint)
    tiles = [read_tile(f, args.tiles) for f in discover(args.tiles)[0]]
    print(f"{args.checkpoint} ({model.config['name']}), {len(tiles)} tiles; bf16 autocast vs fp32")
    print(f"{'tile':<42} {'max|d|':>8} {'mean|d|':>9} {'dNDVI-RMSE':>11} {'dEdge':>9} {'dRMSE-truth':>12}")
    worst = 0.0
    for t in tiles:
        a, b = refine(model, t, False), refine(model, t, True)
        d = np.abs(a - b)
        qa, qb = tile_quality(t.array, a), tile_quality(t.array, b)
        dq = {k: (qb[k] - qa[k]) if qa[k] is not None and qb[k] is not None else float("nan") for k in qa}
        dt = float("nan")
        if args.truth is not None and (args.truth / f"{t.name}.npz").is_file():
            truth = read_tile(args.truth / f"{t.name}.npz").array
            dt = rmse(truth, b) - rmse(truth, a)
        worst = max(worst, float(d.max()))
        print(f"{t.name:<42} {d.max():8.2e} {d.mean():9.2e} {dq['ndvi_rmse']:+11.2e} "
              f"{dq['edge_preservation']:+9.2e} {dt:+12.2e}")
    print(f"worst max |fp32 - bf16|: {worst:.2e}")
    if args.layers:
        ref = {t.name: refine(model, t, False) for t in tiles}
        print("kept in fp32 -> worst max |fp32 - bf16|")
        for name, module in layers(model):
            with fp32_inside(module):
                w = max(float(np.abs(ref[t.name] - refine(model, t, True)).max()) for t in tiles)
            print(f"  {name:<16} {w:.2e}")


if __name__ == "__main__":
    main()
