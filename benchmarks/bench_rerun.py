"""What a rerun's trust costs (issue 13): `python benchmarks/bench_rerun.py [--tiles 3000] [--mb 512]`.

Measured side by side in one run, on fabricated outputs (no model needed):
- the rerun trust check of stage2.predict.resume.decide (output JSON, two NPZ headers, input stat)
  against the bare existence check it replaced (stage2.tiles.is_done), per tile;
- the checkpoint fingerprint (SHA-256 through hashlib) in MB/s, which a rerun pays only when the
  summary's cached fingerprint no longer matches the file's path, size and mtime.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from stage2.checkpoint import fingerprint
from stage2.predict.resume import decide
from stage2.tiles import discover, input_state, is_done, tile_name, write_tile


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, default=3000)
    ap.add_argument("--mb", type=int, default=512, help="size of the file fingerprinted")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in", Path(tmp) / "out"
        inp.mkdir()
        arr = np.random.default_rng(0).random((4, 64, 64), dtype=np.float32)
        for i in range(args.tiles):
            path = inp / f"t{i:06d}.npz"
            np.savez(path, opt_v1=arr)
            write_tile(out, path.stem, arr, {"processing": {"checkpoint_sha256": "x", **input_state(path)}})
        files, _ = discover(inp)
        trust = best_of(lambda: decide(files, inp, out, "x", True, "npz"))
        exists = best_of(lambda: [is_done(out, tile_name(f, inp)) for f in files])
        n = len(files)
        print(f"tiles                    {n}")
        print(f"trust check   ms/tile    {1e3 * trust / n:.3f}")
        print(f"exists check  ms/tile    {1e3 * exists / n:.3f}")
        print(f"trust / exists           {trust / exists:.1f}")
        blob = Path(tmp) / "ckpt.pt"
        with open(blob, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        hashing = best_of(lambda: fingerprint(blob))
        print(f"fingerprint   MB/s       {args.mb / hashing:.0f}   ({args.mb} MB in {hashing:.2f} s, page cache warm)")


if __name__ == "__main__":
    main()
