"""The whole run (SPEC 3, 4): in this process through the composed conf/predict.yaml, and once as a user
types it, `python -m stage2.predict ...` in a subprocess."""

import json
import logging

import numpy as np
import torch

import stage2
from helpers import compose_app, make_tile, read_opt_v2, run_cli
from stage2.predict.app import run

SPEC_PROCESSING_KEYS = {"input_file", "checkpoint", "device", "use_amp", "processing_time_ms", "precision",
                        "batch_size", "model", "stage2_version", "cpu_fallback"}
SUMMARY_KEYS = {"found", "processed", "skipped", "failed", "metadata_defaults", "clipped", "cpu_fallbacks",
                "tiles_per_s", "wall_s", "device", "precision"}


def _aoi(tmp_path):
    inp = tmp_path / "in"
    sizes = [(120, 120), (256, 256), (97, 133), (120, 120), (113, 120), (256, 256), (120, 120)]
    metas = [{"month": "jun", "biome_code": 4, "tile_id": "a"}, None, {"month": " September ", "extra": [1]},
             {"month": 6.0, "biome_code": "7", "tile_id": "../../x"}, {"month": "2"}, {"biome_code": 15},
             {"month": None, "note": "ü"}]
    for i, ((h, w), meta) in enumerate(zip(sizes, metas, strict=False)):
        make_tile(inp / f"tile_{i:04d}.npz", h, w, seed=i, meta=meta)
    return inp, sizes, metas


def test_predict_writes_every_tile_equal_to_the_model_alone(tmp_path, tiny_ckpt, cfg_predict, capsys):
    inp, sizes, metas = _aoi(tmp_path)
    out = tmp_path / "out"
    cfg_predict.batch_size, cfg_predict.precision = 4, "32"
    assert run(cfg_predict) == 0
    stdout = capsys.readouterr().out
    assert "nothing to do" not in stdout and "stage2 summary" in stdout
    assert "found 7  processed 7  skipped 0  failed 0" in stdout

    model = stage2.load_model(tiny_ckpt)
    for i, ((h, w), meta) in enumerate(zip(sizes, metas, strict=False)):
        name = f"tile_{i:04d}"
        v2 = read_opt_v2(out / f"{name}.npz")
        assert v2.dtype == np.float32 and v2.shape == (4, h, w)
        assert np.isfinite(v2).all() and v2.min() >= 0 and v2.max() <= 1
        js = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        assert js["stage"] == "stage2_refined" and "T" in js["timestamp"] and js["timestamp"][-6] in "+-"
        assert SPEC_PROCESSING_KEYS <= set(js["processing"])
        assert js["processing"]["device"] == "cpu" and js["processing"]["use_amp"] is False
        assert js["processing"]["precision"] == "32-true" and js["processing"]["batch_size"] == 4
        for k, v in (meta or {}).items():
            if k not in ("month", "biome_code"):
                assert js[k] == v
        v1 = np.load(inp / f"{name}.npz")["opt_v1"]
        with torch.inference_mode():
            alone = model(torch.from_numpy(v1)[None], torch.tensor([js["month"]]), torch.tensor([js["biome_code"]]))
        assert np.abs(alone[0].numpy() - v2).max() <= 1e-5
    js3 = json.loads((out / "tile_0003.json").read_text())
    assert (js3["month"], js3["biome_code"], js3["tile_id"]) == (6, 7, "../../x")
    assert json.loads((out / "tile_0002.json").read_text())["month"] == 9
    assert json.loads((out / "tile_0001.json").read_text())["metadata_defaults"] == ["month", "biome_code"]
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.json").exists()

    summary = json.loads((out / "_stage2_summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert (summary["found"], summary["processed"], summary["skipped"], summary["failed"]) == (7, 7, 0, 0)
    assert summary["metadata_defaults"] == 5   # tiles 1, 2, 4, 5, 6
    assert summary["precision"] == "32-true" and summary["tiles_per_s"] > 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []

    # rerun: nothing to do, fast path
    assert run(cfg_predict) == 0
    assert "nothing to do: 7 tiles already done" in capsys.readouterr().out


def test_python_m_stage2_predict_as_a_user_types_it(tmp_path, tiny_ckpt):
    """The smoke test of the command itself: Hydra's run dir with its config and log, the summary, exit 0."""
    inp, out = tmp_path / "in", tmp_path / "out"
    make_tile(inp / "a.npz", 48, 40, seed=1, meta={"month": "may"})
    make_tile(inp / "b.npz", 32, 32, seed=2)
    r = run_cli([f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "found 2  processed 2  skipped 0  failed 0" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["_stage2_stac", "_stage2_summary.json", "_stage2_tiles.txt",
                                                    "a.json", "a.npz", "b.json", "b.npz"]
    assert (out / "_stage2_tiles.txt").read_text() == "a\nb\n"
    assert read_opt_v2(out / "a.npz").shape == (4, 48, 40)
    (run_dir,) = [d for d in (tmp_path / "outputs" / "predict").glob("*/*") if d.is_dir()]
    assert "stage2 summary" in (run_dir / "stage2_predict.log").read_text()
    assert f"input_dir={inp}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "hardware:" in (run_dir / ".hydra" / "config.yaml").read_text()


def test_lowvr_without_cuda_says_so_and_runs_on_cpu(tmp_path, tiny_ckpt, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)     # also where the suite has a GPU
    inp = tmp_path / "in"
    make_tile(inp / "a.npz", 64, 64)
    cfg = compose_app("predict", ["hardware=lowvr"], tmp_path / "run", checkpoint=tiny_ckpt, input_dir=inp,
                      output_dir=tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="stage2"):
        assert run(cfg) == 0
    assert "CUDA is not available: hardware=lowvr runs on the CPU" in caplog.text
    js = json.loads((tmp_path / "out" / "a.json").read_text())
    from stage2.runtime import cpu_has_native_bf16

    auto = "bf16-mixed" if cpu_has_native_bf16() else "32-true"      # precision=auto on a CPU (SPEC 4)
    assert js["processing"]["device"] == "cpu" and js["processing"]["precision"] == auto
