"""`stage2-infer` with the Stage 2 guide's flags, against `python -m stage2.predict` (SPEC 4).

Most run in this process: `stage2.cli.main(argv)` is what the `stage2-infer` console script calls
(after it, only a fast process exit). In subprocesses, as a user types them: the guide's
`scripts/infer_stage2.py` path and the console script's `--help` (where it is installed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, compose_app, make_tile
from stage2 import cli
from stage2.predict.app import run

GUIDE_PROCESSING_KEYS = {"input_file", "checkpoint", "device", "use_amp", "processing_time_ms", "precision",
                         "batch_size", "model", "stage2_version", "cpu_fallback"}
SIZES = [(32, 32), (40, 48), (64, 56), (32, 32), (40, 48), (17, 30), (64, 56)]


def _tiles(inp: Path) -> None:
    for i, (h, w) in enumerate(SIZES):
        meta = {"month": (i % 12) + 1, "biome_code": i, "tile_id": f"t{i}"} if i % 3 else None
        make_tile(inp / f"tile_{i:02d}.npz", h, w, seed=10 + i, meta=meta)


def _cli(args: list, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """`stage2-infer ARGS` started in `cwd`, in this process: its exit code (output: capsys)."""
    monkeypatch.chdir(cwd)
    try:
        return cli.main([str(a) for a in args])
    except SystemExit as e:         # argparse: --help (0) and usage errors (2)
        return int(e.code)


def _comparable(js: dict) -> dict:
    """An output JSON without what differs between two runs of the same tiles (time, timings)."""
    js = json.loads(json.dumps(js))
    js.pop("timestamp")
    js["processing"].pop("processing_time_ms")
    return js


def _assert_same_outputs(a: Path, b: Path, n: int) -> None:
    names = sorted(p.stem for p in a.glob("*.npz"))
    assert len(names) == n and names == sorted(p.stem for p in b.glob("*.npz"))
    for name in names:
        assert np.array_equal(np.load(a / f"{name}.npz")["opt_v2"], np.load(b / f"{name}.npz")["opt_v2"]), name
        ja = json.loads((a / f"{name}.json").read_text(encoding="utf-8"))
        jb = json.loads((b / f"{name}.json").read_text(encoding="utf-8"))
        assert _comparable(ja) == _comparable(jb), name


def test_guide_flags_give_the_hydra_runs_outputs_and_skip_existing_works(tmp_path, tiny_ckpt, monkeypatch, capsys,
                                                                          restore_root_logger):
    inp = tmp_path / "stage1"
    _tiles(inp)
    hydra_out, cli_out = tmp_path / "out_hydra", tmp_path / "out_cli"

    # exact fp32 on both sides (--no_amp is precision=32): bf16 autocast is not bit-reproducible across runs
    cfg = compose_app("predict", ["trainer.accelerator=cpu", "precision=32"], tmp_path / "run", checkpoint=tiny_ckpt,
                      input_dir=inp, output_dir=hydra_out)
    assert run(cfg) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    capsys.readouterr()
    assert _cli(["--checkpoint", tiny_ckpt, "--input_dir", inp, "--output_dir", cli_out, "--device", "cpu",
                 "--no_amp"], elsewhere, monkeypatch) == 0
    assert "stage2 summary" in capsys.readouterr().out

    _assert_same_outputs(hydra_out, cli_out, len(SIZES))
    js = json.loads((cli_out / "tile_01.json").read_text(encoding="utf-8"))
    assert GUIDE_PROCESSING_KEYS <= set(js["processing"])
    p = js["processing"]
    assert (p["device"], p["use_amp"], p["precision"], p["batch_size"]) == ("cpu", False, "32-true", 4)
    assert (js["month"], js["biome_code"], js["tile_id"]) == (2, 1, "t1")
    s_hydra = json.loads((hydra_out / "_stage2_summary.json").read_text())
    s_cli = json.loads((cli_out / "_stage2_summary.json").read_text())
    for key in ("found", "processed", "skipped", "failed", "metadata_defaults", "device", "precision", "batch_size"):
        assert s_cli[key] == s_hydra[key], key
    assert s_cli["processed"] == len(SIZES)

    # Like a Hydra app: a run dir (relative to where it was started) with the config and the log.
    run_dirs = [d for d in (elsewhere / "outputs" / "predict").glob("*/*") if d.is_dir()]
    assert len(run_dirs) == 1
    assert "stage2 summary" in (run_dirs[0] / "stage2_predict.log").read_text()
    overrides = (run_dirs[0] / ".hydra" / "overrides.yaml").read_text()
    assert "trainer.accelerator=cpu" in overrides and f"input_dir={inp}" in overrides

    # Skip existing (the default): a finished folder is left alone, even a changed output.
    marker = np.full((4, 32, 32), 0.25, np.float32)
    np.savez(cli_out / "tile_00.npz", opt_v2=marker)
    shim = [sys.executable, str(REPO / "scripts" / "infer_stage2.py")]     # the guide's path, literally
    again = subprocess.run([*shim, "--checkpoint", str(tiny_ckpt), "--input_dir", str(inp), "--output_dir",
                            str(cli_out), "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"nothing to do: {len(SIZES)} tiles already done" in again.stdout
    assert np.array_equal(np.load(cli_out / "tile_00.npz")["opt_v2"], marker)

    # --no_skip_existing rewrites every output; a YAML profile sets the batch size and the device.
    profile = tmp_path / "my_profile.yaml"
    profile.write_text("accelerator: cpu\nbatch_size: 3\nnum_workers: 0\n")
    assert _cli(["--checkpoint", tiny_ckpt, "--input_dir", inp, "--output_dir", cli_out, "--no_skip_existing",
                 "--config", profile, "--no_amp"], tmp_path, monkeypatch) == 0
    assert "nothing to do" not in capsys.readouterr().out
    assert np.array_equal(np.load(cli_out / "tile_00.npz")["opt_v2"], np.load(hydra_out / "tile_00.npz")["opt_v2"])
    js = json.loads((cli_out / "tile_03.json").read_text(encoding="utf-8"))
    assert (js["processing"]["batch_size"], js["processing"]["use_amp"], js["processing"]["precision"]) == \
        (3, False, "32-true")
    summary = json.loads((cli_out / "_stage2_summary.json").read_text())
    assert (summary["processed"], summary["skipped"], summary["batch_size"]) == (len(SIZES), 0, 3)


def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, tiny_ckpt, monkeypatch, capsys, restore_root_logger):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)     # also where the suite has a GPU
    inp = tmp_path / "in"
    make_tile(inp / "a.npz", 32, 32)
    assert _cli(["--checkpoint", tiny_ckpt, "--input_dir", inp, "--output_dir", tmp_path / "out", "--device", "cuda"],
                tmp_path, monkeypatch) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("stage2: error: trainer.accelerator=gpu was asked for, but CUDA is not available")
    assert "--device cpu" in line
    assert not (tmp_path / "out" / "a.npz").exists()


def test_help_reads_like_the_guides_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")      # argparse wraps to the terminal; the same width in both processes
    assert _cli(["--help"], tmp_path, monkeypatch) == 0
    r = capsys.readouterr()
    for flag, override in [("--checkpoint", "checkpoint="), ("--input_dir", "input_dir="),
                           ("--output_dir", "output_dir="), ("--config", "hardware="),
                           ("--batch_size", "batch_size="), ("--device", "trainer.accelerator=gpu|cpu"),
                           ("--no_amp", "precision=32"), ("--no_skip_existing", "skip_existing=false")]:
        line = next((ln for ln in r.out.splitlines() if ln.startswith(flag)), "")
        assert override in line, (flag, line)
    assert "exit codes" in r.out and "lowvr" in r.out
    # The console script, where this checkout is installed (pip install -e .); same parser.
    script = shutil.which("stage2-infer") or str(Path(sys.executable).with_name("stage2-infer"))
    if Path(script).is_file():
        s = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert s.returncode == 0 and s.stdout == r.out


@pytest.mark.parametrize("args, message", [
    (["--config", "bigvr"], "--config bigvr: not a hardware profile (cpu, highvr, lowvr)"),
    (["--config", "PROFILE"], "unknown keys batchsize"),
    (["--batch_size", "0"], "--batch_size: must be at least 1"),
    (["--device", "tpu"], "argument --device: invalid choice"),
    (["nonsense_key=1"], "Could not override 'nonsense_key'"),
])
def test_bad_flags_exit_2_with_the_reason(tmp_path, args, message, monkeypatch, capsys):
    profile = tmp_path / "bad.yaml"
    profile.write_text("accelerator: cpu\nbatchsize: 3\n")
    args = [str(profile) if a == "PROFILE" else a for a in args]
    code = _cli(["--checkpoint", tmp_path / "x.pt", "--input_dir", tmp_path, "--output_dir", tmp_path / "o", *args],
                tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.startswith("usage: stage2-infer") and not (tmp_path / "o").exists()


def test_flags_map_onto_the_same_composition():
    """Each flag is the override the help names; a YAML profile merges into `hardware`."""
    from stage2.model import CONF_DIR

    assert cli.CONF_DIR.resolve() == CONF_DIR.resolve()
    base = ["--checkpoint", "c.pt", "--input_dir", "in dir, with comma", "--output_dir", "out"]
    args = cli.build_parser().parse_args([*base, "--config", "highvr", "--batch_size", "2", "--device", "cuda",
                                          "--no_amp", "--no_skip_existing", "quality=false"])
    assert cli.to_overrides(args) == ["hardware=highvr", "batch_size=2", "trainer.accelerator=gpu", "precision=32",
                                      "skip_existing=false", "quality=false"]
    cfg = cli.compose_config(args)
    assert (cfg.batch_size, cfg.trainer.accelerator, str(cfg.precision), cfg.skip_existing, cfg.quality) == \
        (2, "gpu", "32", False, False)
    assert (cfg.checkpoint, cfg.input_dir, cfg.output_dir) == ("c.pt", "in dir, with comma", "out")
    assert cfg.num_workers == 8                         # the rest of highvr

    default = cli.compose_config(cli.build_parser().parse_args(base))
    assert (default.batch_size, default.trainer.accelerator, str(default.precision), default.skip_existing) == \
        (4, "auto", "auto", True)                     # lowvr, as in the guide
    assert default.hydra.runtime.output_dir.startswith(os.getcwd())
