"""Out-of-memory split and CPU fallback; SIGKILL at random moments and resume (SPEC 5)."""

import copy
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from helpers import make_tile, read_opt_v2, write_npz_output
from stage2.checkpoint import fingerprint
from stage2.predict.app import run
from stage2.tiles import input_state


class OOMDouble(nn.Module):
    """The real model, except that it raises CUDA OOM for batches above `limit` and for any tile
    with month 12 (a tile 'too big for the GPU'). Its deep copy, the CPU fallback, is the real model."""

    def __init__(self, real: nn.Module, limit: int) -> None:
        super().__init__()
        self.real, self.limit = real, limit
        self.config, self.patch_size = real.config, real.patch_size
        self.conditioning = real.conditioning
        self.calls: list[int] = []

    def forward_padded(self, x, month, biome):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit or bool((month == 12).any()):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test double)")
        return self.real.forward_padded(x, month, biome)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.real, memo)


def test_oom_splits_the_batch_and_falls_back_to_cpu(tmp_path, tiny_model, cfg_predict, monkeypatch, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    months = [1, 2, 12, 4, 5]
    for i, m in enumerate(months):
        make_tile(inp / f"t{i}.npz", 64, 64, seed=i, meta={"month": m})
    double = OOMDouble(tiny_model, limit=2)
    monkeypatch.setattr("stage2.checkpoint.load_model", lambda path, device="cpu": double)
    cfg_predict.batch_size, cfg_predict.num_workers = 4, 0
    cfg_predict.cpu_streams = 1       # a GPU's OOM, played on the CPU: one forward per batch
    with caplog.at_level(logging.WARNING, logger="stage2"):
        assert run(cfg_predict) == 0
    assert double.calls[0] == 4 and 1 in double.calls          # split 4 -> 2 -> 1
    assert "CPU fallback: t2" in caplog.text
    for i, m in enumerate(months):
        js = json.loads((out / f"t{i}.json").read_text())
        assert js["processing"]["cpu_fallback"] is (m == 12)
        v1 = np.load(inp / f"t{i}.npz")["opt_v1"]
        with torch.inference_mode():
            alone = tiny_model(torch.from_numpy(v1)[None], torch.tensor([m]), torch.tensor([0]))[0].numpy()
        assert np.abs(read_opt_v2(out / f"t{i}.npz") - alone).max() <= 1e-5
    s = json.loads((out / "_stage2_summary.json").read_text())
    assert (s["processed"], s["cpu_fallbacks"], s["failed"]) == (5, 1, 0)


def _valid_outputs(out, names, size):
    for name in names:
        v2 = read_opt_v2(out / f"{name}.npz")
        assert v2.shape == (4, size, size) and np.isfinite(v2).all()
        assert json.loads((out / f"{name}.json").read_text())["stage"] == "stage2_refined"


def test_sigkill_at_random_moments_then_rerun_completes(tmp_path, tiny_ckpt):
    """Five SIGKILLs at random moments while tiles are being written, then a rerun finishes the job."""
    inp, out = tmp_path / "in", tmp_path / "out"
    size, names = 112, [f"tile_{i:03d}" for i in range(400)]
    for i, n in enumerate(names):
        make_tile(inp / f"{n}.npz", size, size, seed=i)
    args = [sys.executable, "-m", "stage2.predict", f"checkpoint={tiny_ckpt}", f"input_dir={inp}",
            f"output_dir={out}", "hardware=cpu", "batch_size=2", "num_workers=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rng = random.Random(0)
    kills = 0
    for _ in range(5):
        before = len(list(out.glob("tile_*.json"))) if out.exists() else 0
        p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:   # wait until this run is writing
            if out.exists() and len(list(out.glob("tile_*.json"))) > before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.25))   # the tiny model writes a few hundred tiles/s: kill early
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        # whatever is there now is either complete or not trusted: every JSON has its NPZ
        for js in out.glob("tile_*.json"):
            assert (out / js.name.replace(".json", ".npz")).is_file()
    assert kills >= 4, "the runs finished before they could be killed: give the test more tiles"
    done_before = len(list(out.glob("tile_*.json")))
    assert 0 < done_before < len(names)
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "_stage2_summary.json").read_text())
    assert s["skipped"] == done_before and s["processed"] == len(names) - done_before and s["failed"] == 0
    _valid_outputs(out, names, size)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.npz" for n in names] + [f"{n}.json" for n in names]
        + ["_stage2_summary.json", "_stage2_tiles.txt", "_stage2_stac"])


def test_stale_temporaries_are_removed_and_fast_rerun(tmp_path, cfg_predict, monkeypatch, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_tile(inp / "a.npz", 32, 32)
    assert run(cfg_predict) == 0
    (out / ".a.npz.999.tmp").write_bytes(b"partial")
    (out / ".b.json.999.tmp").write_bytes(b"{")
    capsys.readouterr()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the nothing-to-do path loaded the checkpoint or built the run")

    # What makes a finished AOI fast: no checkpoint load, no model, no trainer (and no torch import:
    # test_nothing_to_do_path_imports_no_torch checks that in a fresh interpreter).
    monkeypatch.setattr("stage2.predict.app.load_checked_model", must_not_run)
    monkeypatch.setattr("stage2.predict.app.build", must_not_run)
    assert run(cfg_predict) == 0
    assert capsys.readouterr().out == f"nothing to do: 1 tiles already done in {out}\n"
    assert not list(out.glob(".*")), "stale temporaries must be removed"
    assert sorted(p.name for p in out.iterdir()) == ["_stage2_stac", "_stage2_summary.json", "_stage2_tiles.txt",
                                                    "a.json", "a.npz"]


def test_nothing_to_do_path_imports_no_torch(tmp_path, tiny_ckpt):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_tile(inp / "a.npz", 32, 32)
    processing = {"checkpoint_sha256": fingerprint(tiny_ckpt)["sha256"], **input_state(inp / "a.npz")}
    write_npz_output(out, "a", np.zeros((4, 32, 32), np.float32),
                      {"stage": "stage2_refined", "processing": processing})
    code = (f"import sys; sys.argv=['stage2.predict', 'checkpoint={tiny_ckpt}', 'input_dir={inp}', "
            f"'output_dir={out}'];\n"
            "import stage2.predict.app\ntry:\n    stage2.predict.app.main()\nexcept SystemExit as e:\n    pass\n"
            "assert 'torch' not in sys.modules and 'terratorch' not in sys.modules, 'heavy import'\nprint('LIGHT')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "LIGHT" in r.stdout and "nothing to do" in r.stdout, r.stderr[-2000:]


def test_compile_failure_falls_back_to_eager(tmp_path, tiny_model, monkeypatch, caplog):
    from stage2.predict.data import collate
    from stage2.predict.module import Stage2Module
    from stage2.tiles import Tile

    def broken_compile(fn, **kwargs):
        def call(*a, **k):
            raise RuntimeError("Compiler: cc not found (test double)")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    module = Stage2Module(tiny_model, compile=True, cpu_streams=1, tta="none", quality=True, pixel_stats="host")
    module.setup("predict")
    arr = np.random.default_rng(0).random((4, 40, 40), dtype=np.float32)
    batch = collate([Tile("a", None, arr, {}, 6, 0)], 16)
    with caplog.at_level(logging.WARNING, logger="stage2"), torch.inference_mode():
        pred = module.predict_step(batch, 0)
        alone = tiny_model(torch.from_numpy(arr)[None], torch.tensor([6]), torch.tensor([0]))[0].numpy()
    assert "torch.compile failed (Compiler: cc not found" in caplog.text
    assert np.abs(pred.outputs[0] - alone).max() <= 1e-6 and module._compiled is None
