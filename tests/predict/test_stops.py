"""Runs cut short (SPEC 5): exit 3 when the output folder fails mid-run or something unexpected
happens, 130 on Ctrl-C or SIGTERM; each with its summary, one console line and no traceback, and
a rerun that finishes the job. Also a tile too large for the memory, which fails alone."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import compose_predict, console_lines, make_tile, mounted, read_opt_v2, remount
from stage2.predict.app import run


def _run(capsys, ckpt, inp, out, *overrides):
    code = run(compose_predict(f"checkpoint={ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu",
                               "batch_size=2", *overrides))
    return code, capsys.readouterr().err.strip().splitlines()


def _tiles(inp, n, size=64):
    for i in range(n):
        make_tile(inp / f"t{i:03d}.npz", size, size, seed=i)


def _trusted_outputs(out):
    """Every output with a JSON is complete; no temporaries; returns the names."""
    names = sorted(p.stem for p in out.glob("t*.json"))
    for n in names:
        assert read_opt_v2(out / f"{n}.npz").shape[0] == 4
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    return names


def _write_hook(monkeypatch, after, action):
    """Run `action()` once `after` tiles have been written (the folder fails mid-run)."""
    from stage2.predict import writer

    real, calls = writer.write_output, []

    def write_output(*a, **k):
        if len(calls) == after:
            action()
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(writer, "write_output", write_output)


@pytest.mark.parametrize("threads", [0, 2])      # written between batches (cpu profile) or by writer threads (GPUs)
def test_disk_full_stops_at_once_and_a_rerun_finishes(tmp_path, tiny_ckpt, capsys, threads):
    inp = tmp_path / "in"
    _tiles(inp, 12)                     # 66 kB per output NPZ: about four fit in 300 kB
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=300k", "tmpfs") as small:
        out = small / "out"
        code, err = _run(capsys, tiny_ckpt, inp, out, f"writer_threads={threads}")
        assert code == 3 and len(err) == 1, err
        assert err[0].startswith("stage2: stopped: disk full") and "rerun" in err[0]
        s = json.loads((out / "_stage2_summary.json").read_text())
        assert s["stopped"].startswith("disk full") and s["interrupted"] is False
        assert 0 < s["processed"] < 12 and s["failed"] == 0, s     # no tile was "failed" for the folder's problem
        assert not (out / "_stage2_failures.jsonl").exists()
        assert len(_trusted_outputs(out)) == s["processed"]
        remount(small, "size=4m")
        code, err = _run(capsys, tiny_ckpt, inp, out)
        assert code == 0, err
        s2 = json.loads((out / "_stage2_summary.json").read_text())
        assert (s2["skipped"], s2["processed"], s2.get("stopped")) == (s["processed"], 12 - s["processed"], None)
        assert len(_trusted_outputs(out)) == 12


def test_output_folder_turning_read_only_mid_run(tmp_path, tiny_ckpt, capsys, monkeypatch):
    inp, src = tmp_path / "in", tmp_path / "src"
    _tiles(inp, 8, 32)
    src.mkdir()
    with mounted(tmp_path / "mnt", "--bind", str(src)) as mnt:
        _write_hook(monkeypatch, 3, lambda: remount(mnt, "ro,bind"))
        code, err = _run(capsys, tiny_ckpt, inp, mnt)
    assert code == 3 and len(err) == 1, err
    assert "stopped: read-only" in err[0] and "summary not written" in err[0]
    assert _trusted_outputs(src) == ["t000", "t001", "t002"]
    monkeypatch.undo()
    assert _run(capsys, tiny_ckpt, inp, src)[0] == 0
    assert len(_trusted_outputs(src)) == 8


def test_output_folder_removed_mid_run_is_not_recreated(tmp_path, tiny_ckpt, capsys, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    _tiles(inp, 8, 32)
    _write_hook(monkeypatch, 3, lambda: shutil.rmtree(out))
    code, err = _run(capsys, tiny_ckpt, inp, out)
    assert code == 3 and len(err) == 1 and f"the output folder {out} is gone" in err[0], err
    assert not out.exists()


def _patched_run(args, cwd, patch):
    """`python -m stage2.predict ARGS` with `patch` (Python source) applied first."""
    code = (f"import sys; sys.argv = ['stage2.predict', *{args!r}]\n{patch}\n"
            "from stage2.runtime import run_then_exit\nfrom stage2.predict.app import main\nrun_then_exit(main)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_an_unexpected_error_is_exit_3_one_line_and_the_traceback_in_the_log(tmp_path, tiny_ckpt):
    inp, out = tmp_path / "in", tmp_path / "out"
    _tiles(inp, 6, 32)
    patch = ("import stage2.predict.module as m\nreal = m.Stage2Module.predict_step\n"
             "def step(self, batch, i, *a):\n    if i == 1:\n        raise RuntimeError('boom in batch 1')\n"
             "    return real(self, batch, i, *a)\nm.Stage2Module.predict_step = step")
    args = [f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu", "batch_size=2",
            f"hydra.run.dir={tmp_path / 'run'}"]
    r = _patched_run(args, tmp_path, patch)
    assert r.returncode == 3, r.stderr[-3000:]
    lines = console_lines(r.stderr)
    assert len(lines) == 1 and "stopped: unexpected RuntimeError: boom in batch 1" in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "Traceback" in (tmp_path / "run" / "stage2_predict.log").read_text()
    s = json.loads((out / "_stage2_summary.json").read_text())
    assert s["stopped"] == "unexpected RuntimeError: boom in batch 1" and s["processed"] == 2

    r = _patched_run([*args, "verbose=true", "skip_existing=false"], tmp_path, patch)
    assert r.returncode == 3 and "Traceback" in r.stderr and "boom in batch 1" in r.stderr


def test_sigint_and_sigterm_exit_130_with_a_summary_and_a_rerun_finishes(tmp_path, tiny_ckpt):
    inp, out = tmp_path / "in", tmp_path / "out"
    _tiles(inp, 160, 48)
    args = [sys.executable, "-m", "stage2.predict", f"checkpoint={tiny_ckpt}", f"input_dir={inp}",
            f"output_dir={out}", "hardware=cpu", "batch_size=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and len(list(out.glob("t*.json"))) <= done:
            time.sleep(0.02)
        assert p.poll() is None, "the run ended before it could be interrupted: give it more tiles"
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 130, (sig, stderr[-3000:])
        lines = console_lines(stderr)
        assert len(lines) == 1 and lines[0].startswith("stage2: interrupted: "), (sig, stderr[-2000:])
        assert "Traceback" not in stderr + stdout
        s = json.loads((out / "_stage2_summary.json").read_text())
        assert s["interrupted"] is True and s["stopped"] is None and 0 < s["processed"] + s["skipped"] < 160
        done = len(_trusted_outputs(out))
        assert done == s["processed"] + s["skipped"]
        assert not (out / "_stage2_lock.json").exists()
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "_stage2_summary.json").read_text())["skipped"] == done
    assert len(_trusted_outputs(out)) == 160
