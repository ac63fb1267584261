"""Run-level problems found before anything is written: exit 2, one line, nothing created (SPEC 4, 5).

Also one run per output folder: a lock naming its holder, taken over from a dead one.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import compose_predict, console_lines, make_tile, mounted, remount, run_cli
from stage2.predict.app import run
from stage2.runtime import temporary_name
from stage2.store import LOCK_FILE, LocalStore
from stage2.store.lock import RunLock


def _run(capsys, ckpt, inp, out, *overrides):
    code = run(compose_predict(f"checkpoint={ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu",
                               *overrides))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("override,words", [
    ("batch_size=0", "batch_size=0 is not valid"),
    ("num_workers=-1", "num_workers=-1 is not valid"),
    ("precision=fp16", "precision=fp16 is not a precision"),
    ("batch_size=four", "batch_size=four is not valid"),
])
def test_bad_settings_are_one_line_and_create_nothing(tmp_path, tiny_ckpt, capsys, override, words):
    make_tile(tmp_path / "in" / "a.npz", 32, 32)
    code, err = _run(capsys, tiny_ckpt, tmp_path / "in", tmp_path / "out", override)
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_or_under_one(tmp_path, tiny_ckpt, capsys):
    make_tile(tmp_path / "in" / "a.npz", 32, 32)
    (tmp_path / "afile").write_text("mine")
    code, err = _run(capsys, tiny_ckpt, tmp_path / "in", tmp_path / "afile")
    assert code == 2 and len(err) == 1 and "is not a directory" in err[0]
    code, err = _run(capsys, tiny_ckpt, tmp_path / "in", tmp_path / "afile" / "sub")
    assert code == 2 and len(err) == 1 and f"{tmp_path / 'afile'} is a file" in err[0]
    assert (tmp_path / "afile").read_text() == "mine"


def test_read_only_output_dir(tmp_path, tiny_ckpt, capsys):
    make_tile(tmp_path / "in" / "a.npz", 32, 32)
    (tmp_path / "src").mkdir()
    with mounted(tmp_path / "ro", "--bind", str(tmp_path / "src")) as ro:
        remount(ro, "ro,bind")
        for out in (ro, ro / "out"):
            code, err = _run(capsys, tiny_ckpt, tmp_path / "in", out)
            assert code == 2 and len(err) == 1 and "read-only" in err[0], err
    assert list((tmp_path / "src").iterdir()) == []


def test_output_dir_is_the_input_dir_by_another_path(tmp_path, tiny_ckpt, capsys):
    """A symlink and a bind mount reach the input folder under another name: refused, inputs untouched."""
    inp = tmp_path / "in"
    make_tile(inp / "a.npz", 32, 32)
    before = (inp / "a.npz").read_bytes()
    (tmp_path / "link").symlink_to(inp)
    code, err = _run(capsys, tiny_ckpt, inp, tmp_path / "link", "skip_existing=false")
    assert code == 2 and len(err) == 1 and "is the input_dir" in err[0]
    with mounted(tmp_path / "bound", "--bind", str(inp)) as bound:
        code, err = _run(capsys, tiny_ckpt, inp, bound, "skip_existing=false")
        assert code == 2 and len(err) == 1 and "is the input_dir" in err[0]
    assert sorted(p.name for p in inp.iterdir()) == ["a.npz"] and (inp / "a.npz").read_bytes() == before


def test_hydra_config_errors_are_exit_2_not_1(tmp_path, tiny_ckpt):
    """Exit 1 means "some tiles failed"; a typo in a key is a run-level error."""
    r = run_cli([f"checkpoint={tiny_ckpt}", f"input_dir={tmp_path}", f"output_dir={tmp_path / 'o'}", "batchsize=2"],
                cwd=tmp_path)
    assert r.returncode == 2 and "batchsize" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- one run per folder
def test_a_second_run_on_a_folder_in_use_exits_2_naming_the_first(tmp_path, tiny_ckpt):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_tile(inp / "a.npz", 32, 32)
    (tmp_path / "other_path").symlink_to(out, target_is_directory=True)
    with RunLock(out):                      # the first run (this process) holds the folder
        holder = json.loads((out / LOCK_FILE).read_text())
        r = run_cli([f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={tmp_path / 'other_path'}",
                     "hardware=cpu"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    line = console_lines(r.stderr)
    assert len(line) == 1 and "in use by another stage2 run" in line[0], r.stderr
    assert f"pid {os.getpid()} on {socket.gethostname()}, started {holder['started']}" in line[0]
    assert sorted(p.name for p in out.iterdir()) == [], "the lock is released and nothing was written"


def test_a_dead_runs_lock_is_taken_over_and_another_hosts_is_not(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_tile(inp / "a.npz", 32, 32)
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "then"}))
    code, err = _run(capsys, tiny_ckpt, inp, out)
    assert code == 0, err
    assert not (out / LOCK_FILE).exists() and (out / "a.json").is_file()

    (out / LOCK_FILE).write_text(json.dumps({"pid": 1234, "host": "node-elsewhere", "started": "earlier"}))
    code, err = _run(capsys, tiny_ckpt, inp, out)
    assert code == 2 and len(err) == 1 and "another host" in err[0] and "node-elsewhere" in err[0]
    assert f"delete {out / LOCK_FILE}" in err[0]


def test_only_a_dead_processs_temporaries_are_removed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = tmp_path / f".a.npz.{os.getppid()}.tmp"             # a live process's write in flight
    dead = tmp_path / f".a.npz.{gone.pid}.tmp"
    mine = temporary_name(tmp_path / "b.json")
    older = tmp_path / ".c.json.tmp"                             # an older stage2's, without a pid
    user = [tmp_path / ".notes.tmp", tmp_path / ".notes.txt.77.tmp", tmp_path / ".x.npz.12ab.tmp"]
    for p in (live, dead, mine, older, *user):
        p.write_bytes(b"x")
    assert LocalStore(tmp_path).clean_temporaries() == 2
    assert not dead.exists() and not older.exists()
    assert live.exists() and mine.exists() and all(p.exists() for p in user)


def test_tiles_named_like_the_runs_own_files_fail_clearly(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_tile(inp / "_stage2_summary.npz", 32, 32)
    make_tile(inp / "_stage2_lock.npz", 32, 32, seed=1)
    make_tile(inp / "good.npz", 32, 32, seed=2)
    code, _ = _run(capsys, tiny_ckpt, inp, out)
    assert code == 1
    summary = json.loads((out / "_stage2_summary.json").read_text())
    assert (summary["processed"], summary["failed"]) == (1, 2)
    failures = [json.loads(x) for x in (out / "_stage2_failures.jsonl").read_text().splitlines()]
    assert sorted(os.path.basename(f["file"]) for f in failures) == ["_stage2_lock.npz", "_stage2_summary.npz"]
    assert all("run's own files" in f["reason"] and "rename" in f["hint"] for f in failures)
    assert sorted(p.name for p in out.iterdir()) == ["_stage2_failures.jsonl", "_stage2_stac", "_stage2_summary.json",
                                                     "_stage2_tiles.txt", "good.json", "good.npz"]
    assert (out / "_stage2_tiles.txt").read_text() == "good\n"
    assert np.load(out / "good.npz")["opt_v2"].shape == (4, 32, 32)
