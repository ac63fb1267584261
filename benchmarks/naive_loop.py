"""The Stage 2 guide's style of inference loop, as a baseline: one tile at a time, batch 1, serially.

Per tile: np.load, forward at batch 1 under no_grad, np.savez, write the JSON sidecar. Same model
(stage2.load_model), same outputs as stage2; no batching, no overlap of I/O and compute.
usage: python naive_loop.py CHECKPOINT INPUT_DIR OUTPUT_DIR
"""

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import stage2
from stage2.tiles import normalise_biome, normalise_month

if __name__ == "__main__":
    ckpt, inp, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    model = stage2.load_model(ckpt)
    for f in sorted(inp.glob("*.npz")):
        t = time.perf_counter()
        arr = np.load(f)["opt_v1"].astype(np.float32)
        side = f.with_suffix(".json")
        meta = json.loads(side.read_text()) if side.exists() else {}
        month = normalise_month(meta["month"]) if meta.get("month") is not None else 6
        biome = normalise_biome(meta["biome_code"]) if meta.get("biome_code") is not None else 0
        with torch.no_grad():
            v2 = model(torch.from_numpy(arr)[None], torch.tensor([month]), torch.tensor([biome]))[0].numpy()
        np.savez(out / f.name, opt_v2=v2)
        meta.update(month=month, biome_code=biome, stage="stage2_refined",
                    timestamp=datetime.now(timezone.utc).isoformat(),
                    processing={"input_file": str(f), "checkpoint": ckpt, "device": "cpu", "use_amp": False,
                                "processing_time_ms": 1000 * (time.perf_counter() - t)})
        (out / f"{f.stem}.json").write_text(json.dumps(meta, indent=2))
