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
from stage2.predict.plan import Plan
from stage2.predict.resume import decide
from stage2.product import is_done, write_output
from stage2.store import open_store, relative_key
from stage2.tiles import discover, input_state, tile_name


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
        outputs = open_store(out)
        outputs.make()
        arr = np.random.default_rng(0).random((4, 64, 64), dtype=np.float32)
        for i in range(args.tiles):
            path = inp / f"t{i:06d}.npz"
            np.savez(path, opt_v1=arr)
            write_output(outputs, path.stem, {"opt_v2": arr},
                         {"processing": {"checkpoint_sha256": "x", **input_state(path)}},
                         output_format="npz", geo=None, cog_settings=None)
        files, _ = discover(inp)

        def trust() -> None:
            """What a rerun does before it decides: the output listing, each input's state, every verdict."""
            p = Plan(inp, out, Path("ckpt.pt"), inputs=open_store(inp), outputs=outputs, files=list(files),
                     fingerprint={"sha256": "x"})
            p.listing = outputs.listing()
            p.states = {relative_key(f, inp): input_state(f) for f in files}
            decide(p, {f: tile_name(f, inp) for f in files}, True, "npz")

        trust_s = best_of(trust)
        exists = best_of(lambda: [is_done(set(os.listdir(out)), tile_name(f, inp), "npz") for f in files])
        n = len(files)
        print(f"tiles                    {n}")
        print(f"trust check   ms/tile    {1e3 * trust_s / n:.3f}")
        print(f"exists check  ms/tile    {1e3 * exists / n:.3f}")
        print(f"trust / exists           {trust_s / exists:.1f}")
        blob = Path(tmp) / "ckpt.pt"
        with open(blob, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        hashing = best_of(lambda: fingerprint(blob))
        print(f"fingerprint   MB/s       {args.mb / hashing:.0f}   ({args.mb} MB in {hashing:.2f} s, page cache warm)")


if __name__ == "__main__":
    main()
