"""Per-tile cost of the formats, side by side in one run: GeoTIFF vs NPZ reads, COG vs NPZ writes (ms per tile).

Inputs are the real demo tiles (120 and 256 px) as NPZ and as GeoTIFF (float32 reflectance, and
uint16 digital numbers with input_scale), each with its sidecar. Outputs are an opt_v2-like array
(the tile plus full-precision float noise: a model's output, unlike the inputs' 1e-4 steps, does not
compress like quantised data). Every variant runs once per round, in turn, so a drifting shared
machine affects them alike; each figure is the median of the rounds. COG variants measure the
choices behind conf/predict.yaml's `cog:` comments. With --listing N, also the time of one listing
of a prefix holding N finished tiles (NPZ + COG + JSON each) on a local S3 API (moto, its own process).

With --pipeline N, instead, whole `python -m stage2.predict` runs over N tiles side by side: NPZ -> NPZ
and GeoTIFF -> COG, steady tiles/s from each run's summary (issue 15's "within 10 %").

usage: python benchmarks/bench_formats.py [--rounds 15] [--listing 1000]
       python benchmarks/bench_formats.py --pipeline 64 [--pipeline-rounds 3] [--model prithvi_eo_v1_100]
       [--precision 32|auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo_aoi"
TRANSFORM = (10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)


def make_inputs(work: Path) -> dict[int, list[str]]:
    """NPZ, float GeoTIFF and uint16 GeoTIFF copies of each demo tile, by size; returns the stems."""
    import rasterio
    from affine import Affine

    stems: dict[int, list[str]] = {}
    for npz in sorted(DEMO.glob("*.npz")):
        arr = np.load(npz)["opt_v1"]
        stem = npz.stem
        stems.setdefault(arr.shape[1], []).append(stem)
        side = (DEMO / f"{stem}.json").read_text()
        for name, data in ((f"{stem}.npz", None), (f"{stem}.tif", arr), (f"{stem}_dn.tif", _dn(arr))):
            (work / Path(name).with_suffix(".json")).write_text(side)
            if data is None:
                np.savez(work / name, opt_v1=arr)
                continue
            with rasterio.open(work / name, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=4,
                               dtype=str(data.dtype), crs="EPSG:32633", transform=Affine(*TRANSFORM)) as ds:
                ds.write(data)
    return stems


def _dn(arr: np.ndarray) -> np.ndarray:
    return np.round((arr.astype(np.float64) + 0.1) / 1e-4).astype(np.uint16)


def cog_variants(shipped: dict) -> dict[str, dict]:
    """The shipped settings and one change each (what the YAML comments compare)."""
    return {
        "cog (shipped)": shipped,
        "cog deflate 1": {**shipped, "compress": "deflate", "level": 1},
        "cog deflate 6": {**shipped, "compress": "deflate", "level": 6},
        "cog zstd 9": {**shipped, "level": 9},
        "cog block 512": {**shipped, "blocksize": 512},
        "cog 1 overview": {**shipped, "overviews": 1},
    }


def measure(stems: dict[int, list[str]], work: Path, rounds: int) -> dict[tuple[int, str], list[float]]:
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    from stage2 import formats, tiles
    from stage2.formats import cog
    from stage2.store import open_store

    shipped = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "predict.yaml").cog)
    variants = {k: cog.CogSettings(**v) for k, v in cog_variants(shipped).items()}
    out = open_store(work / "out")
    out.make()
    rng = np.random.default_rng(0)
    v2 = {}
    for s in (s for ss in stems.values() for s in ss):
        arr = np.load(DEMO / f"{s}.npz")["opt_v1"]
        v2[s] = np.clip(arr + rng.normal(0, 2e-3, arr.shape).astype(np.float32), 0, 1)
    geo = tiles.GeoRef("EPSG:32633", TRANSFORM)

    def rio_cogeo(stem: str) -> None:
        profile = {**cog_profiles.get("zstd"), "blockxsize": shipped["blocksize"],
                   "blockysize": shipped["blocksize"], "predictor": 3, "level": shipped["level"]}
        src = work / "out" / f"{stem}.tif"      # the shipped COG, written just before: same pixels
        cog_translate(str(src), str(work / "out" / f"{stem}_ct.tif"), profile, nodata=float("nan"),
                      in_memory=True, quiet=True)

    ops = {
        "read npz": lambda s: formats.read_tile(work / f"{s}.npz", input_scale=None, input_offset=None),
        "read tif float32": lambda s: formats.read_tile(work / f"{s}.tif", input_scale=None, input_offset=None),
        "read tif uint16 DN": lambda s: formats.read_tile(work / f"{s}_dn.tif", input_scale=1e-4, input_offset=-0.1),
        "write npz": lambda s: out.write(f"{s}.npz", lambda f: np.savez(f, opt_v2=v2[s])),
        **{f"write {k}": (lambda s, st=st, k=k: cog.write_cog(out, f"{s}_{k.replace(' ', '_')}.tif", v2[s], geo, st)
                          if k != "cog (shipped)" else cog.write_cog(out, f"{s}.tif", v2[s], geo, st))
           for k, st in variants.items()},
        "write rio-cogeo cog_translate": rio_cogeo,
    }
    times: dict[tuple[int, str], list[float]] = {}
    for r in range(rounds + 1):                     # round 0 warms up GDAL, the page cache and imports
        for size, ss in stems.items():
            for name, op in ops.items():
                t = time.perf_counter()
                for s in ss:
                    op(s)
                if r:
                    times.setdefault((size, name), []).append(1000 * (time.perf_counter() - t) / len(ss))
    sizes = {(size, name): os.path.getsize(work / "out" / _file(ss[0], name))
             for size, ss in stems.items() for name in ops if name.startswith("write")}
    return times, sizes


def _file(stem: str, op: str) -> str:
    kind = op.removeprefix("write ")
    if kind == "npz":
        return f"{stem}.npz"
    if kind == "rio-cogeo cog_translate":
        return f"{stem}_ct.tif"
    return f"{stem}.tif" if kind == "cog (shipped)" else f"{stem}_{kind.replace(' ', '_')}.tif"


def listing_time(n_tiles: int) -> dict[str, float]:
    """Seconds to list a prefix holding n_tiles finished outputs (NPZ + COG + JSON) on a local S3 API.

    moto runs as its own process (as a real endpoint would be: in this process it would share the
    GIL with the client). `cold_*`: a fresh `python -c` that imports stage2.store (and s3fs) and
    lists once, what a rerun pays, best of 3; `warm_listing_s`: another listing in one process.
    """
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                              aws_secret_access_key="bench", region_name="us-east-1")
        for _ in range(100):                            # wait for the server
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        for i in range(n_tiles):
            for ext in ("npz", "tif", "json"):
                client.put_object(Bucket="bench", Key=f"out/t{i:05d}.{ext}", Body=b"x")
        code = ("import time; t = time.perf_counter(); from stage2.store import open_store; "
                "n = len(open_store('s3://bench/out').listing()); t1 = time.perf_counter(); "
                "open_store('s3://bench/out').listing(); print(t1 - t, time.perf_counter() - t1, n)")
        runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
                .stdout.split() for _ in range(3)]
        assert all(int(r[2]) == 3 * n_tiles for r in runs)
        return {"objects": 3 * n_tiles, "cold_import_and_listing_s": round(min(float(r[0]) for r in runs), 3),
                "warm_listing_s": round(min(float(r[1]) for r in runs), 3)}
    finally:
        server.terminate()
        server.wait()


def pipeline_tiles_per_s(count: int, rounds: int, model: str, batch: int, precision: str) -> dict[str, object]:
    """Steady tiles/s of `python -m stage2.predict` over the same `count` tiles, NPZ in -> NPZ out and
    GeoTIFF in -> COG out, one run each per round in turn (hardware=cpu, fp32, fresh `model` weights).

    The tiles are the 120 px demo tiles repeated (GeoTIFF: the same pixels as float32, georeferenced,
    same sidecars); the figure is the run summary's `tiles_per_s` (model steady state, writes included:
    hardware=cpu writes between batches), median of the rounds.
    """
    import subprocess
    import sys

    import rasterio
    import torch
    from affine import Affine

    import stage2

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        ckpt = stage2.save_checkpoint(stage2.build_model(model), work / "model.pt")
        sources = [p for p in sorted(DEMO.glob("*.npz")) if np.load(p)["opt_v1"].shape[1] == 120]
        (work / "npz").mkdir()
        (work / "tif").mkdir()
        for i in range(count):
            src = sources[i % len(sources)]
            arr, side = np.load(src)["opt_v1"], (DEMO / f"{src.stem}.json").read_text()
            np.savez(work / "npz" / f"t{i:04d}.npz", opt_v1=arr)
            with rasterio.open(work / "tif" / f"t{i:04d}.tif", "w", driver="GTiff", width=arr.shape[2],
                               height=arr.shape[1], count=4, dtype="float32", crs="EPSG:32633",
                               transform=Affine(*TRANSFORM)) as ds:
                ds.write(arr)
            for d in ("npz", "tif"):
                (work / d / f"t{i:04d}.json").write_text(side)
        runs: dict[str, list[float]] = {"npz -> npz": [], "geotiff -> cog": []}
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        for r in range(rounds):
            for name, inp, fmt in (("npz -> npz", "npz", "npz"), ("geotiff -> cog", "tif", "cog")):
                out = work / f"out_{fmt}_{r}"
                subprocess.run([sys.executable, "-m", "stage2.predict", "hardware=cpu", f"precision={precision}",
                                f"batch_size={batch}", f"checkpoint={ckpt}", f"input_dir={work / inp}",
                                f"output_dir={out}", f"output_format={fmt}", "trainer.enable_progress_bar=false",
                                f"hydra.run.dir={work / 'runs' / f'{fmt}_{r}'}"], env=env, check=True,
                               capture_output=True)
                runs[name].append(json.loads((out / "_stage2_summary.json").read_text())["tiles_per_s"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"model": model, "tiles": count, "batch_size": batch, "rounds": rounds, "precision": precision,
            **{f"{k} tiles/s": round(v, 2) for k, v in med.items()},
            "cog/npz": round(med["geotiff -> cog"] / med["npz -> npz"], 3),
            "all": {k: [round(x, 2) for x in v] for k, v in runs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--listing", type=int, default=0, help="also time one listing of this many finished tiles on moto")
    ap.add_argument("--pipeline", type=int, default=0, metavar="TILES",
                    help="only compare whole predict runs over this many tiles: NPZ -> NPZ vs GeoTIFF -> COG")
    ap.add_argument("--pipeline-rounds", type=int, default=3)
    ap.add_argument("--model", default="prithvi_eo_v1_100", help="model of the --pipeline runs (fresh weights)")
    ap.add_argument("--precision", default="32", help="precision of the --pipeline runs (32, auto, bf16)")
    ap.add_argument("--batch-size", type=int, default=4, help="batch size of the --pipeline runs")
    args = ap.parse_args()
    if args.pipeline:
        print(json.dumps(pipeline_tiles_per_s(args.pipeline, args.pipeline_rounds, args.model, args.batch_size,
                                              args.precision)))
        return
    warnings.filterwarnings("ignore", message="Non-standard compression schema")   # rio-cogeo on zstd
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stems = make_inputs(work)
        times, sizes = measure(stems, work, args.rounds)
    print(f"ms per tile, median of {args.rounds} rounds (variants interleaved); {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    for size in sorted(stems):
        print(f"\n{size} px ({len(stems[size])} real tiles)")
        base = {"read": statistics.median(times[(size, "read npz")]),
                "write": statistics.median(times[(size, "write npz")])}
        for (s, name), ts in times.items():
            if s != size:
                continue
            ms = statistics.median(ts)
            ratio = ms / base[name.split()[0]]
            extra = f"  {sizes[(size, name)] / 1024:7.0f} KiB" if (size, name) in sizes else ""
            print(f"  {name:34s} {ms:7.2f} ms  x{ratio:5.2f} of npz{extra}")
    if args.listing:
        print(json.dumps({"listing_tiles": args.listing, **listing_time(args.listing)}))


if __name__ == "__main__":
    main()
