"""Build a seeded, *untrained* prithvi_eo_tiny Stage 2 checkpoint (the demo's fallback checkpoint).

Its weights are random: outputs show the pipeline, not refinement quality. `stage2.train` makes
trained checkpoints.
"""

import argparse

import torch

import stage2

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("path")
    ap.add_argument("--model", default="prithvi_eo_tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    stage2.save_checkpoint(stage2.build_model(args.model), args.path)
    print(f"wrote {args.path} ({args.model}, seed {args.seed}, untrained)")
