"""What the hand-off costs at the end of a run: `python benchmarks/bench_handoff.py [--outputs 10000]`.

Builds N synthetic outputs in a temporary folder (a JSON as this version writes it, with `shape`,
`files`, `band_stats`, `crs` and `transform`, beside a small stand-in `.tif`: no raster is read for
such outputs), then times side by side, best of `--repeat`:
- the floor: one recursive listing of the folder and reading + parsing every output JSON;
- stage2.handoff.rebuild: the same, plus the tile list, the aggregate statistics, the TerraTorch
  file, the footprints reprojected to WGS84 and N STAC Items and the collection written;
- rebuild given the JSONs (as predict calls it, with what it already holds);
- the first rebuild of the folder (every Item file created), beside what creating N small files
  atomically with plain os calls costs on the same disk (the part no catalog writer avoids).
The target: rebuild at most 2 s above the floor for 10,000 outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from stage2.handoff import rebuild
from stage2.handoff.outputs import output_names, read_metadata
from stage2.store import open_store

BANDS = ("B02", "B03", "B04", "B08")


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def fabricate(folder: Path, n: int) -> None:
    """n outputs `t000000` ... in two UTM zones, as `output_format=cog` writes them (the COG a stand-in)."""
    for i in range(n):
        name = f"t{i:06d}"
        zone = 32633 if i % 2 else 32632
        meta = {"month": 1 + i % 12, "biome_code": i % 16, "tile_id": name, "acquired": "2020-06-15T10:30:00Z",
                "crs": f"EPSG:{zone}", "transform": [10.0, 0.0, 500000.0 + 2560 * (i % 100), 0.0, -10.0,
                                                     5000000.0 - 2560 * (i // 100)],
                "stage": "stage2_refined", "timestamp": "2025-06-01T12:00:00+00:00", "metadata_defaults": [],
                "processing": {"input_file": f"/data/stage1/{name}.npz", "checkpoint": "/ckpt/refiner.pt",
                               "checkpoint_sha256": "0" * 64, "model": "prithvi_eo_tiny", "precision": "32-true",
                               "stage2_version": "0.1.0", "device": "cpu", "batch_size": 8},
                "quality": {"ndvi_rmse": 0.01, "edge_preservation": 0.95},
                "schema_version": 1, "shape": [256, 256],
                "files": [{"path": f"{name}.tif", "format": "cog", "layers": ["opt_v2"]}],
                "band_stats": {b: {"count": 65536, "mean": 0.1 + 0.01 * k + 1e-6 * i, "std": 0.05, "min": 0.0,
                                   "max": 0.9} for k, b in enumerate(BANDS)}}
        (folder / f"{name}.tif").write_bytes(b"II*\x00stand-in")
        (folder / f"{name}.json").write_text(json.dumps(meta, indent=2))


def floor(folder: Path) -> int:
    """A bare listing and every output JSON read and parsed: what any hand-off must pay."""
    store = open_store(folder)
    return len(read_metadata(store, output_names(store.listing(recursive=True))))


def fresh(folder: Path) -> float:
    """The time of a rebuild that creates every Item (the catalog removed first, untimed)."""
    shutil.rmtree(folder / "_stage2_stac", ignore_errors=True)
    t = time.perf_counter()
    rebuild(folder)
    return time.perf_counter() - t


def create_files(folder: Path, n: int, size: int) -> float:
    """Creating n files of `size` bytes atomically (temporary, then rename) with plain os calls."""
    folder.mkdir()
    data = b"x" * size
    t = time.perf_counter()
    for i in range(n):
        tmp, final = folder / f".f{i}.tmp", folder / f"f{i}.json"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
        os.replace(tmp, final)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--outputs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out"
        folder.mkdir()
        fabricate(folder, args.outputs)
        rebuild(folder)                     # the first run creates the catalog's folders; later runs rewrite
        store = open_store(folder)
        metadata = read_metadata(store, output_names(store.listing(recursive=True)))
        base = best_of(lambda: floor(folder), args.repeat)
        full = best_of(lambda: rebuild(folder), args.repeat)
        given = best_of(lambda: rebuild(folder, metadata), args.repeat)
        first = min(fresh(folder) for _ in range(args.repeat))
        creating = min(create_files(Path(tmp) / f"files{i}", args.outputs, 3400) for i in range(args.repeat))
        result = rebuild(folder)
        n = len(result.outputs)
        print(f"outputs                                 {n}  ({len(result.tiles)} in the tile list)")
        print(f"listing + read JSONs (floor)      s     {base:.3f}")
        print(f"rebuild, finding the outputs      s     {full:.3f}   (+{full - base:.3f} s, {full / base:.2f}x)")
        print(f"rebuild, given the JSONs          s     {given:.3f}   (+{given - base:.3f} s)")
        print(f"per output beyond the floor       ms    {1e3 * (full - base) / n:.3f}")
        print(f"first rebuild (every Item new)    s     {first:.3f}   (+{first - base:.3f} s)")
        print(f"creating {n} files of 3.4 kB      s     {creating:.3f}   (plain os calls, same disk)")


if __name__ == "__main__":
    main()
