"""AOI sweeps: `aoi=NAME` paths, a multirun over AOIs that keeps going past a failing one, and the
SLURM launcher entry (SPEC 4)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import compose_app, make_tile, run_cli


def _have_submitit() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:          # no Hydra plugin at all: hydra_plugins itself is missing
        return False


HAVE_SUBMITIT = _have_submitit()
NO_SUBMITIT = "hydra-submitit-launcher is not installed (pip install -e '.[slurm]')"


def _compose(overrides: list[str]):
    return compose_app("predict", ["checkpoint=c.pt", *overrides])


def test_aoi_sets_the_folders_and_explicit_folders_win():
    cfg = _compose(["aoi=iowa", "data_root=/data"])
    assert (cfg.input_dir, cfg.output_dir) == ("/data/stage1_outputs/iowa", "/data/stage2_outputs/iowa")
    cfg = _compose(["aoi=iowa", "data_root=/data", "input_dir=/mine/in"])
    assert (cfg.input_dir, cfg.output_dir) == ("/mine/in", "/data/stage2_outputs/iowa")
    cfg = _compose(["aoi=iowa", "output_dir=/mine/out"])
    assert (cfg.input_dir, cfg.output_dir) == ("data/stage1_outputs/iowa", "/mine/out")
    cfg = _compose([])
    assert (cfg.input_dir, cfg.output_dir) == (None, None)


def _data_root(root: Path) -> dict[str, int]:
    """iowa: 3 good tiles; brazil: 2 good + 1 NaN tile; kenya: an empty folder; amazon: no folder."""
    s1 = root / "stage1_outputs"
    for i, (h, w) in enumerate([(32, 32), (40, 48), (32, 32)]):
        make_tile(s1 / "iowa" / f"i{i}.npz", h, w, seed=i, meta={"month": "may"})
    for i in range(2):
        make_tile(s1 / "brazil" / f"b{i}.npz", 48, 40, seed=20 + i)
    bad = np.full((4, 32, 32), np.nan, np.float32)
    np.savez(s1 / "brazil" / "b9_bad.npz", opt_v1=bad)
    (s1 / "kenya").mkdir(parents=True)
    return {"iowa": 3, "brazil": 2}


def _job_dirs(sweep_dir: Path) -> dict[str, Path]:
    return {d.name.split("_", 1)[1]: d for d in sweep_dir.iterdir() if d.is_dir() and d.name[0].isdigit()}


def test_sweep_runs_every_aoi_and_reports_each(tmp_path, tiny_ckpt):
    root = tmp_path / "data"
    good = _data_root(root)
    sweep_dir = tmp_path / "sweep"
    r = run_cli(["-m", f"checkpoint={tiny_ckpt}", f"data_root={root}", "aoi=kenya,iowa,amazon,brazil",
                 "hardware=cpu", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, timeout=600)
    # brazil: a tile failed (1); kenya and amazon: run-level errors (2); the sweep exits with the worst.
    assert r.returncode == 2, r.stderr[-3000:]

    # every AOI ran, in its own run dir with its own log; the good ones wrote everything
    jobs = _job_dirs(sweep_dir)
    assert sorted(jobs) == ["amazon", "brazil", "iowa", "kenya"]
    for name, d in jobs.items():
        assert (d / "stage2_predict.log").is_file(), name
        assert json.loads((d / "stage2_job.json").read_text())["aoi"] == name
    for name, n in good.items():
        out = root / "stage2_outputs" / name
        summary = json.loads((out / "_stage2_summary.json").read_text())
        assert (summary["found"], summary["processed"]) == (n + (name == "brazil"), n)
        assert len(list(out.glob("*.npz"))) == n and len(list(out.glob("*.json"))) == n + 1
        assert "stage2 summary" in (jobs[name] / "stage2_predict.log").read_text()
    assert json.loads((root / "stage2_outputs" / "brazil" / "_stage2_summary.json").read_text())["failed"] == 1
    assert not (root / "stage2_outputs" / "kenya").exists() and not (root / "stage2_outputs" / "amazon").exists()

    # the sweep ends with one line per AOI: name, exit code, counts or the reason
    tail = r.stdout[r.stdout.index("stage2 sweep: 4 AOIs, 1 ok, 3 failed"):].splitlines()
    lines = {ln.split()[0]: ln for ln in tail[1:5]}
    assert sorted(lines) == ["amazon", "brazil", "iowa", "kenya"]
    assert "exit 0  processed 3  failed 0" in lines["iowa"]
    assert "exit 1  processed 2  failed 1" in lines["brazil"]
    assert "exit 2  error: No tiles (*.npz, *.tif, *.tiff) found in" in lines["kenya"]
    assert "exit 2  error: input_dir" in lines["amazon"] and "does not exist" in lines["amazon"]


def test_report_exits_zero_when_every_aoi_succeeded_and_forgets_older_sweeps(tmp_path, capsys):
    from omegaconf import OmegaConf

    from stage2.predict.sweep import JOB_FILE, SweepReport

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    stale = tmp_path / "0_old"
    stale.mkdir()
    (stale / JOB_FILE).write_text(json.dumps({"aoi": "old", "code": 2, "error": "from an earlier sweep"}))
    report = SweepReport()
    report.on_multirun_start(cfg)
    assert not (stale / JOB_FILE).exists()
    for num, (aoi, outcome) in enumerate([("a", {"summary": {"processed": 5, "failed": 0, "skipped": 1,
                                                              "output_dir": "/o/a"}}),
                                          ("b", {"nothing_to_do": 7, "output_dir": "/o/b"})]):
        d = tmp_path / f"{num}_{aoi}"
        d.mkdir()
        (d / JOB_FILE).write_text(json.dumps({"aoi": aoi, "code": 0, "job_num": num, **outcome}))
    report.on_multirun_end(cfg)          # no SystemExit: every AOI succeeded
    out = capsys.readouterr().out
    assert "2 AOIs, 2 ok, 0 failed" in out and "old" not in out
    assert "a  exit 0  processed 5  failed 0  skipped 1" in out
    assert "b  exit 0  nothing to do: 7 tiles already done" in out


@pytest.mark.skipif(not HAVE_SUBMITIT, reason=NO_SUBMITIT)
def test_slurm_launcher_entry_composes(tmp_path):
    r = run_cli(["hydra/launcher=slurm", "checkpoint=c.pt", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                 "-p", "hydra.launcher"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in r.stdout
    assert "timeout_min: 120" in r.stdout and "partition: gpu" in r.stdout and "tasks_per_node: 1" in r.stdout


@pytest.mark.skipif(not HAVE_SUBMITIT, reason=NO_SUBMITIT)
def test_sweep_through_submitit_reports_from_job_files(tmp_path, tiny_ckpt):
    """submitit_local runs each AOI in its own process, as SLURM would: the report still adds up."""
    root = tmp_path / "data"
    make_tile(root / "stage1_outputs" / "iowa" / "a.npz", 32, 32)
    sweep_dir = tmp_path / "sweep"
    r = run_cli(["-m", "hydra/launcher=submitit_local", f"checkpoint={tiny_ckpt}", f"data_root={root}",
                 "aoi=iowa,amazon", "hardware=cpu", f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.timeout_min=10"],
                cwd=tmp_path, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "stage2 sweep: 2 AOIs, 1 ok, 1 failed" in r.stdout
    assert (root / "stage2_outputs" / "iowa" / "a.json").is_file()
    assert sorted(_job_dirs(sweep_dir)) == ["amazon", "iowa"]

