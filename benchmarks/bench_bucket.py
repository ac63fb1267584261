"""Bucket runs (issue 15, docs/output.md#cog) on a local S3 API: the rerun of a finished prefix, as a user runs it.

moto runs as its own process (as a real endpoint would: in the client's process it would share its
GIL). N small tiles (half with a sidecar) are uploaded to s3://bench/in; `python -m stage2.predict`
runs once over them into s3://bench/out (tiny model, CPU; this is the setup, timed too), then the
same command is rerun `--reruns` times over the finished prefix: each rerun's whole-process wall time,
from the shell's point of view (interpreter start, Hydra, imports, lock, both listings, the index),
and it must print `nothing to do: N tiles already done`. For reference, the same rerun over a local
copy of the same finished folder.

usage: python benchmarks/bench_bucket.py [--tiles 1000] [--reruns 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def start_moto() -> tuple[subprocess.Popen, dict[str, str]]:
    """A moto server process on a free port, and the environment that points s3fs at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_EC2_METADATA_DISABLED": "true", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return server, env


def make_inputs(local: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    local.mkdir(parents=True)
    for i in range(n):
        arr = np.clip(0.3 + 0.05 * rng.standard_normal((4, size, size)), 0, 1).astype(np.float32)
        np.savez(local / f"t{i:05d}.npz", opt_v1=arr)
        if i % 2:
            (local / f"t{i:05d}.json").write_text(json.dumps({"month": 1 + i % 12, "biome_code": i % 16}))


def upload(local: Path, url: str, env: dict[str, str]) -> None:
    """Upload in a child process that has the bench environment (s3fs reads AWS_* when it starts)."""
    code = ("import sys; from pathlib import Path; from stage2.store import open_store\n"
            "src, f = Path(sys.argv[1]), open_store(sys.argv[2])\n"
            "for _ in range(100):\n"
            "    try:\n        f.fs.mkdir(f.url.split('://')[1].split('/')[0]); break\n"
            "    except FileExistsError:\n        break\n"
            "    except Exception:\n        import time; time.sleep(0.1)\n"
            "files = sorted(src.iterdir())\n"
            "f.fs.put([str(p) for p in files], [f'{f._prefix}/{p.name}' for p in files])\n")
    subprocess.run([sys.executable, "-c", code, str(local), url], env=env, check=True)


def predict(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "stage2.predict", *args], cwd=cwd, env=env, capture_output=True,
                       text=True)
    return time.perf_counter() - t, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=1000)
    ap.add_argument("--size", type=int, default=32, help="px side of the tiles")
    ap.add_argument("--reruns", type=int, default=5)
    a = ap.parse_args()
    import torch

    import stage2

    server, env = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            torch.manual_seed(0)
            ckpt = stage2.save_checkpoint(stage2.build_model("prithvi_eo_tiny"), work / "tiny.pt")
            make_inputs(work / "in", a.tiles, a.size)
            upload(work / "in", "s3://bench/in", env)
            common = [f"checkpoint={ckpt}", "hardware=cpu", "precision=32", "batch_size=32",
                      "trainer.enable_progress_bar=false", f"hydra.run.dir={work / 'runs'}"]
            bucket = ["input_dir=s3://bench/in", "output_dir=s3://bench/out", *common]
            first, r = predict(bucket, env, work)
            assert r.returncode == 0, r.stderr[-3000:]
            summary = {"first_run_s": round(first, 2)}
            walls = []
            for _ in range(a.reruns):
                wall, r = predict(bucket, env, work)
                assert r.returncode == 0 and r.stdout.startswith(f"nothing to do: {a.tiles} tiles"), r.stdout + r.stderr
                walls.append(wall)
            local = [f"input_dir={work / 'in'}", f"output_dir={work / 'out'}", *common]
            _, r = predict(local, env, work)
            assert r.returncode == 0, r.stderr[-3000:]
            local_walls = [predict(local, env, work)[0] for _ in range(a.reruns)]
            shutil.rmtree(work / "runs", ignore_errors=True)
        summary.update(tiles=a.tiles, objects_listed=2 * a.tiles + a.tiles + a.tiles // 2,
                       bucket_rerun_s_median=round(statistics.median(walls), 3),
                       bucket_rerun_s_min=round(min(walls), 3),
                       local_rerun_s_median=round(statistics.median(local_walls), 3),
                       local_rerun_s_min=round(min(local_walls), 3),
                       cpus=os.cpu_count(), load_average=round(os.getloadavg()[0], 1))
        print(json.dumps(summary))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
