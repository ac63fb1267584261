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
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from stage2.handoff import rebuild
from stage2.handoff.outputs import output_names, read_metadata
from stage2.store import open_store

BANDS = ("B02", "B03", "B04", "B08")


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """The best wall time and the best CPU time (user + system of this process) of `repeat` calls. The CPU
    time is what a busy machine changes least: on shared cores the wall time also counts others' work."""
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


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


def fresh(folder: Path, aside: Path) -> tuple[float, float]:
    """Wall and CPU time of a rebuild that creates every Item. The catalog is moved aside first, untimed:
    deleting 10,000 files just before creating as many slows ext4's creates several-fold for a while,
    which would measure the disk's clean-up rather than the rebuild."""
    (folder / "_stage2_stac").rename(aside)
    t, c = time.perf_counter(), time.process_time()
    rebuild(folder)
    return time.perf_counter() - t, time.process_time() - c


def create_files(folder: Path, n: int, size: int) -> tuple[float, float]:
    """Wall and CPU time of creating n files of `size` bytes atomically (temporary, then rename) with os calls."""
    folder.mkdir()
    data = b"x" * size
    t, c = time.perf_counter(), time.process_time()
    for i in range(n):
        tmp, final = folder / f".f{i}.tmp", folder / f"f{i}.json"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
        os.replace(tmp, final)
    return time.perf_counter() - t, time.process_time() - c


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
        first = min(fresh(folder, Path(tmp) / f"aside{i}") for i in range(args.repeat))
        creating = min(create_files(Path(tmp) / f"files{i}", args.outputs, 3400) for i in range(args.repeat))
        result = rebuild(folder)
        n = len(result.outputs)
        print(f"outputs {n} ({len(result.tiles)} in the tile list); best of {args.repeat}; seconds")
        print(f"{'':36}{'wall':>8}{'beyond':>9}{'cpu':>8}{'beyond':>9}")
        rows = [("listing + read JSONs (the floor)", base), ("rebuild, finding the outputs", full),
                ("rebuild, given the JSONs", given), ("first rebuild (every Item new)", first)]
        for label, (wall, cpu) in rows:
            print(f"{label:36}{wall:8.3f}{wall - base[0]:+9.3f}{cpu:8.3f}{cpu - base[1]:+9.3f}")
        print(f"{'ratio rebuild / floor':36}{full[0] / base[0]:8.2f}{'':9}{full[1] / base[1]:8.2f}")
        print(f"{f'creating {n} files of 3.4 kB (os)':36}{creating[0]:8.3f}{'':9}{creating[1]:8.3f}"
              "   (what any catalog writer pays for new Items on this disk)")

if __name__ == "__main__":
    main()
