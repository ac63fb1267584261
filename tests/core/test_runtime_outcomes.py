"""The one error wrapper and its exit codes (SPEC 5): one console line per outcome, one meaning per code."""

import os
import signal
import typing

import pytest

from stage2.runtime import (
    LIGHTNING_PRECISIONS,
    RunError,
    RunStopped,
    check_precision,
    guarded,
    temporary_name,
    temporary_owner,
)


def _raise(e):
    def run():
        raise e
    return run


@pytest.mark.parametrize("error,code,line", [
    (RunError("output_dir /x is read-only: choose another"), 2, "stage2: error: output_dir /x is read-only"),
    (RunStopped("disk full (No space left on device) writing to /x: ..."), 3, "stage2: stopped: disk full"),
    (RuntimeError("boom\nsecond line"), 3, "stage2: stopped: unexpected RuntimeError: boom (traceback in"),
    (KeyboardInterrupt(), 130, "stage2: interrupted"),
])
def test_each_outcome_is_one_line_and_its_own_exit_code(capsys, error, code, line):
    outcome = {}
    assert guarded(_raise(error), outcome=outcome) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert "Traceback" not in err[0] and outcome["error"]


def test_sigterm_is_an_interruption_not_a_kill(capsys):
    before = signal.getsignal(signal.SIGTERM)

    def run():
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    assert guarded(run) == 130
    assert capsys.readouterr().err.strip() == "stage2: interrupted"
    assert signal.getsignal(signal.SIGTERM) is before        # restored after the command


def test_precisions_are_lightnings_own():
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR

    assert set(LIGHTNING_PRECISIONS) == set(typing.get_args(_PRECISION_INPUT_STR))
    for ok in ("auto", "32", "16", "bf16", "64", "bf16-mixed", " 16-MIXED "):
        check_precision(ok)
    with pytest.raises(RunError, match="precision=fp16 is not a precision"):
        check_precision("fp16")


def test_temporary_names_carry_their_owner(tmp_path):
    assert temporary_owner(temporary_name(tmp_path / "a.npz")) == os.getpid()
    assert temporary_owner(tmp_path / ".a.json.tmp") == 0              # an older stage2's, no pid
    for user in (".notes.tmp", ".a.txt.12.tmp", "a.npz", ".a.npz.x1.tmp"):
        assert temporary_owner(tmp_path / user) is None
