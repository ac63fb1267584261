"""stage2.runtime: the one error wrapper and its exit codes, the atomic write, the run-level checks and the
precision mapping every command shares (SPEC 4, 5)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from stage2.runtime import (
    EXIT_INTERRUPTED,
    EXIT_RUN_ERROR,
    RunError,
    atomic_write,
    atomic_write_text,
    exit_with,
    guarded,
    require_dir,
    required,
    resolve_accelerator,
    resolve_precision,
    temporary_name,
    uses_amp,
)


def _raise(exc: BaseException):
    def run() -> int:
        raise exc
    return run


# ---------------------------------------------------------------------------- guarded
def test_guarded_returns_the_runs_exit_code(capsys):
    assert guarded(lambda: 0) == 0
    assert guarded(lambda: 1) == 1
    assert capsys.readouterr() == ("", "")


def test_run_error_is_one_stderr_line_and_exit_2(capsys):
    outcome: dict = {}
    code = guarded(_raise(RunError("input_dir /x does not exist: point it at the tiles")),
                   OmegaConf.create({"verbose": False}), prog="stage2 report", outcome=outcome)
    out, err = capsys.readouterr()
    assert code == EXIT_RUN_ERROR == 2
    assert err.splitlines() == ["stage2 report: error: input_dir /x does not exist: point it at the tiles"]
    assert out == "" and "Traceback" not in err
    assert outcome == {"error": "input_dir /x does not exist: point it at the tiles"}


def test_verbose_prints_the_traceback_and_keeps_the_exit_code(capsys):
    assert guarded(_raise(RunError("bad folder")), OmegaConf.create({"verbose": True})) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "RunError: bad folder" in err and err.splitlines()[-1] == "stage2: error: bad folder"


def test_ctrl_c_is_exit_130(capsys):
    outcome: dict = {}
    assert guarded(_raise(KeyboardInterrupt()), prog="stage2", outcome=outcome) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err.splitlines() == ["stage2: interrupted"]
    assert outcome == {"error": "interrupted"}


def test_an_unexpected_exception_stops_with_exit_3_and_one_line(capsys):
    """SPEC 5: an unexpected exception is exit 3 (not 1, which means "some tiles failed")."""
    assert guarded(lambda: 1 // 0) == 3
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("stage2: stopped: unexpected ZeroDivisionError: integer division or modulo by zero")


def test_exit_with_leaves_through_sys_exit_only_for_non_zero():
    assert exit_with(0) == 0
    with pytest.raises(SystemExit) as e:
        exit_with(2)
    assert e.value.code == 2


# ---------------------------------------------------------------------------- atomic_write
def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    final = tmp_path / "a.json"
    final.write_text("old")
    assert atomic_write_text(final, "néw\n") == final
    assert final.read_bytes() == "néw\n".encode()
    assert _listing(tmp_path) == ["a.json"]


def test_a_failing_writer_keeps_the_old_file_and_no_temporary(tmp_path):
    final = tmp_path / "a.npz"
    final.write_bytes(b"the old, complete file")
    seen = []

    def half_then_fail(f) -> None:
        f.write(b"half of the new")
        seen.append(Path(f.name))
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(final, half_then_fail)
    assert final.read_bytes() == b"the old, complete file"
    assert _listing(tmp_path) == ["a.npz"]
    assert seen == [tmp_path / f".a.npz.{os.getpid()}.tmp"]      # it did write, beside the final file


def test_ctrl_c_while_writing_leaves_no_temporary(tmp_path):
    final = tmp_path / "new.json"

    def interrupted(f) -> None:
        f.write(b"{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(final, interrupted)
    assert _listing(tmp_path) == []


def test_temporary_name_is_hidden_and_owned_by_this_process(tmp_path):
    assert temporary_name(tmp_path / "t_01.npz") == tmp_path / f".t_01.npz.{os.getpid()}.tmp"


# ---------------------------------------------------------------------------- run-level checks
def test_require_dir_says_what_is_wrong_and_what_to_do(tmp_path):
    assert require_dir(tmp_path, "input_dir", "hint") == tmp_path
    missing = tmp_path / "nope"
    with pytest.raises(RunError) as e:
        require_dir(missing, "input_dir", "point input_dir at the folder of Stage 1 tiles")
    assert str(e.value) == f"input_dir {missing} does not exist: point input_dir at the folder of Stage 1 tiles"
    a_file = tmp_path / "f.npz"
    a_file.write_bytes(b"")
    with pytest.raises(RunError) as e:
        require_dir(a_file, "output_dir", "pass output_dir=DIR")
    assert str(e.value) == f"output_dir {a_file} is not a directory: pass output_dir=DIR"


def test_required_names_the_key_to_pass():
    cfg = OmegaConf.create({"truth_dir": "???", "input_dir": None, "output_dir": "", "seed_dir": "/t"})
    for key in ("truth_dir", "input_dir", "output_dir"):
        with pytest.raises(RunError) as e:
            required(cfg, key, "the true optical tiles")
        assert str(e.value) == f"{key} is not set: pass {key}=... (the true optical tiles)"
    assert required(cfg, "seed_dir", "x") == "/t"


# ---------------------------------------------------------------------------- precision and accelerator
@pytest.mark.parametrize("value, on_gpu, expected", [
    # ("auto" on a CPU follows the CPU's native bf16: tests/core/test_precision.py)
    ("auto", True, "16-mixed"),                  # the profile's amp_precision on a GPU
    (32, True, "32-true"), ("32", False, "32-true"), (16, True, "16-mixed"), ("bf16", True, "bf16-mixed"),
    (" BF16 ", False, "bf16-mixed"), ("64", False, "64-true"),
    ("16-mixed", True, "16-mixed"), ("bf16-true", True, "bf16-true"),       # Lightning strings pass through
])
def test_resolve_precision(value, on_gpu, expected):
    assert resolve_precision(value, on_gpu, "16-mixed") == expected


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_bf16_profile_falls_back_to_fp16_where_the_gpu_lacks_bf16(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    assert resolve_precision("auto", True, "bf16-mixed") == expected


def test_uses_amp_is_true_for_reduced_precision_only():
    assert [uses_amp(p) for p in ("32-true", "64-true", "16-mixed", "bf16-mixed", "bf16-true")] == \
        [False, False, True, True, True]


def test_accelerator_without_cuda(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = OmegaConf.create({"trainer": {"accelerator": "auto"}})
    with caplog.at_level("WARNING", logger="stage2"):
        assert resolve_accelerator(cfg) == "cpu"
    assert "CUDA is not available" in caplog.text
    cfg.trainer.accelerator = "gpu"
    with pytest.raises(RunError, match="use hardware=cpu or trainer.accelerator=cpu"):
        resolve_accelerator(cfg)
    cfg.trainer.accelerator = "cpu"
    assert resolve_accelerator(cfg) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg.trainer.accelerator = "auto"
    assert resolve_accelerator(cfg) == "gpu"
