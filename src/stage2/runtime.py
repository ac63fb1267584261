"""What every entry point shares: the run-error type and exit codes, one guarded entry, precision and
accelerator resolution, the config resolvers, process settings and one atomic-write helper.

Light on purpose (standard library, OmegaConf): the "nothing to do" path and the report use it
without importing torch. torch is imported inside the functions that need it.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("stage2")

# Exit codes, one meaning each (docs/usage.md#errors).
EXIT_OK = 0              # every tile written
EXIT_TILES_FAILED = 1    # some tiles failed, each listed in _stage2_failures.jsonl
EXIT_RUN_ERROR = 2       # a run-level error found before anything was written
EXIT_STOPPED = 3         # stopped part-way (disk full, output folder gone, unexpected error); rerun resumes
EXIT_INTERRUPTED = 130   # Ctrl-C or SIGTERM

TMP_SUFFIX = ".tmp"
# `.<name>.<pid>.tmp` (temporary_name) of an output file: the pid says whose it is, so only a dead
# process's are removed. `.<name>.tmp` (no pid) is an older stage2's. Other hidden files are a user's.
_TMP_NAME = re.compile(r"^\.(?P<name>.+\.(npz|json|jsonl|tif|tiff))(\.(?P<pid>\d+))?" + re.escape(TMP_SUFFIX) + "$")


class RunError(Exception):
    """A run-level problem: one line naming the path and what to do; exit code 2, nothing written."""


class RunStopped(Exception):
    """The run stopped part-way (exit 3): the summary already says what was done; `str()` is the console line."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run (exit 130): the summary says `"interrupted": true`; `str()` says what was done."""


# Set by guarded() when the command itself starts: a SystemExit(1) before that is Hydra's own
# config error (an unknown key, a bad override), which run_then_exit reports as exit 2.
_task_started = False
# The signal that interrupted this process (SIGINT/SIGTERM), if any: Lightning turns the
# KeyboardInterrupt it sees into sys.exit(1), and this tells the app it was an interruption.
_interrupted_by: int | None = None


# ---------------------------------------------------------------------------- entry points
def guarded(run: Callable[[], int], cfg: DictConfig | None = None, prog: str = "stage2",
            outcome: dict[str, Any] | None = None) -> int:
    """Call `run()` and turn what it raises into an exit code: the one error wrapper of every command.

    Each outcome is one console line on stderr (docs/usage.md#errors): RunError -> `<prog>: error: ...`, exit 2;
    RunStopped -> `<prog>: stopped: ...`, exit 3; any other exception -> `<prog>: stopped:
    unexpected ...`, exit 3; Ctrl-C or SIGTERM -> `<prog>: interrupted`, exit 130. The traceback
    always goes to the log file, and to the console only with `verbose=true`. `outcome`, when
    given, receives the error text (sweeps report it).
    """
    global _task_started
    _task_started = True
    with interrupt_signals():
        try:
            return run()
        except BaseException as e:
            outcome_of = _classify(e)
            if outcome_of is None:      # SystemExit and the like pass through
                raise
            code, line = outcome_of
            log_to_file(f"{prog}: {line}", exc_info=code != EXIT_INTERRUPTED)
            if cfg is not None and cfg.get("verbose") and code != EXIT_INTERRUPTED:
                traceback.print_exc(file=sys.stderr)
    print(f"{prog}: {line}", file=sys.stderr)
    if outcome is not None:
        outcome["error"] = "interrupted" if code == EXIT_INTERRUPTED else line.split(": ", 1)[-1]
    return code


def _classify(e: BaseException) -> tuple[int, str] | None:
    """(exit code, console line) of what a command raised; None for what must pass through."""
    if isinstance(e, RunError):
        return EXIT_RUN_ERROR, f"error: {e}"
    if isinstance(e, RunStopped):
        return EXIT_STOPPED, f"stopped: {e}"
    if isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and interrupted_by_signal()):
        return EXIT_INTERRUPTED, f"interrupted: {e}" if isinstance(e, RunInterrupted) else "interrupted"
    if isinstance(e, Exception):
        return EXIT_STOPPED, (f"stopped: unexpected {type(e).__name__}: {first_line(e)} "
                              f"(traceback in {log_file() or 'the log'})")
    return None


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text (or its type), for one-line messages."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def log_file() -> str | None:
    """The path of the log file a FileHandler writes to (the Hydra run dir's log), if any."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            return h.baseFilename
    return None


def log_to_file(message: str, exc_info: bool = False) -> None:
    """Write `message` (and the current traceback) to the log file only, never to the console."""
    record = log.makeRecord(log.name, logging.ERROR if exc_info else logging.INFO, __file__, 0, message, (),
                            sys.exc_info() if exc_info else None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


# ---------------------------------------------------------------------------- signals
def _raise_interrupt(signum: int, frame: Any) -> None:
    global _interrupted_by
    _interrupted_by = signum
    raise KeyboardInterrupt


@contextmanager
def interrupt_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt for the command's duration (exit 130, docs/usage.md#errors).

    SIGTERM would otherwise end the process at once, with no summary. DataLoader workers inherit
    the handler; torch's worker loop ends quietly on KeyboardInterrupt. Outside the main thread
    (signals cannot be set there) nothing changes.
    """
    global _interrupted_by
    _interrupted_by = None
    try:
        before = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:          # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def hydra_main(config_name: str, run: Callable[[DictConfig], int]) -> Callable[[], Any]:
    """A Hydra app over conf/<config_name>.yaml whose task is `run(cfg)`; a non-zero code is the exit code.

    For the commands with one mode (degrade, evaluate); predict and report also handle sweeps.
    """
    import hydra

    from . import CONF_DIR

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def main(cfg: DictConfig) -> int:
        return exit_with(run(cfg))

    return main


def interrupted_by_signal() -> bool:
    """Whether SIGINT/SIGTERM arrived during this command (Lightning reports it as SystemExit(1))."""
    return _interrupted_by is not None


def exit_with(code: int) -> int:
    """The end of a Hydra task function: a non-zero code leaves through sys.exit (Hydra passes it on)."""
    if code:
        sys.exit(code)
    return code


def required(cfg: DictConfig, key: str, what: str) -> str:
    """The value of a mandatory key (`???` in the YAML), or RunError "<key> is not set: pass <key>=... (<what>)"."""
    if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
        raise RunError(f"{key} is not set: pass {key}=... ({what})")
    return str(cfg.get(key))


def require_dir(path: Path, key: str, hint: str) -> Path:
    """`path` if it is a directory, else RunError "<key> <path> does not exist|is not a directory: <hint>"."""
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise RunError(f"{key} {path} {what}: {hint}")
    return path


# ---------------------------------------------------------------------------- config resolvers
def _aoi_dir(data_root: str, kind: str, aoi: str | None) -> str | None:
    if aoi in (None, "", "None"):
        return None
    if "://" in str(data_root):             # a bucket (docs/buckets.md): Path would fold the URL's "//"
        return f"{str(data_root).rstrip('/')}/{kind}/{aoi}"
    return str(Path(data_root) / kind / str(aoi))


def register_resolvers() -> None:
    """`${stage2_aoi_dir:root,kind,aoi}` (predict.yaml, report.yaml): data_root/kind/aoi, or null without an AOI."""
    OmegaConf.register_new_resolver("stage2_aoi_dir", _aoi_dir, replace=True)


# ---------------------------------------------------------------------------- devices and precision
# Lightning's precision strings (lightning.fabric.plugins.precision.precision._PRECISION_INPUT_STR,
# Lightning 2.6; tests/core compares them), and stage2's short forms. Written out here so a typo
# such as `precision=fp16` is a run-level error before anything is imported or written.
LIGHTNING_PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
                        "bf16-mixed", "32-true", "64-true")
_PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}


def check_precision(value: Any) -> None:
    """RunError naming the accepted values unless `precision` is auto, a short form or a Lightning string."""
    text = str(value).strip().lower()
    if text != "auto" and text not in _PRECISION_ALIASES and text not in LIGHTNING_PRECISIONS:
        raise RunError(f"precision={value} is not a precision: use auto, 32, 16, bf16 or one of Lightning's "
                       f"{', '.join(LIGHTNING_PRECISIONS)}")


def resolve_precision(value: Any, on_gpu: bool, profile_amp: str) -> str:
    """Map the user's `precision` onto a Lightning precision string (docs/usage.md#running).

    `auto`: on a GPU the profile's mixed precision (fp16 where bf16 is not supported); on a CPU
    bf16 autocast where the CPU computes bf16 natively, else fp32. `32` is always exact fp32.
    """
    text = str(value).strip().lower()
    if text == "auto":
        if not on_gpu:
            return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
        if profile_amp.startswith("bf16"):
            import torch
            if not torch.cuda.is_bf16_supported():
                return "16-mixed"
        return profile_amp
    return _PRECISION_ALIASES.get(text, text)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as PyTorch's cpuinfo reports it.

    Why it matters: with native bf16, oneDNN runs the model's matrix products in bf16 at about twice
    the fp32 speed (measured on this project's Zen 5 CPU: 44.9 vs 22.2 tiles/s, prithvi_eo_v1_100,
    128 px, batch 4). Without it, bf16 is emulated and slower than fp32, so `auto` stays fp32 there.
    """
    import torch

    cpu = torch.cpu
    checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def uses_amp(precision: str) -> bool:
    """Whether a Lightning precision string runs in reduced precision (the JSON's `use_amp`)."""
    return precision in ("16-mixed", "bf16-mixed", "16-true", "bf16-true", "transformer-engine")


def resolve_accelerator(cfg: DictConfig) -> str:
    """`auto`/`gpu`/`cuda`/`cpu`; a GPU profile on a machine without CUDA says so and uses the CPU."""
    import torch

    wanted = str(cfg.trainer.accelerator).lower()
    if wanted in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RunError(f"trainer.accelerator={wanted} was asked for, but CUDA is not available on this machine: "
                       "use hardware=cpu or trainer.accelerator=cpu (stage2-infer: --device cpu)")
    if wanted == "auto":
        if torch.cuda.is_available():
            return "gpu"
        log.warning("CUDA is not available: hardware=%s runs on the CPU", _profile_name())
        return "cpu"
    return wanted


def _profile_name() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        return str(HydraConfig.get().runtime.choices.get("hardware", "?"))
    except Exception:
        return "(profile)"


def hydra_run_dir() -> Path:
    """The Hydra run dir of this job, or the working directory outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path.cwd()


# ---------------------------------------------------------------------------- files
def temporary_name(final: Path) -> Path:
    """`.<name>.<pid>.tmp` beside `final`: never mistaken for an output, and owned by this process."""
    return final.with_name(f".{final.name}.{os.getpid()}{TMP_SUFFIX}")


def temporary_owner(path: Path) -> int | None:
    """The pid in a `.<name>.<pid>.tmp` name, 0 for an older stage2's `.<name>.tmp`, None for a user's file."""
    m = _TMP_NAME.match(path.name)
    if m is None:
        return None
    return int(m.group("pid")) if m.group("pid") else 0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


# Errors that mean the output folder itself can no longer be written: the run stops (exit 3)
# instead of computing tiles it cannot write. Anything else while writing fails that tile alone.
FOLDER_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only",
                 errno.ENOENT: "gone", errno.EACCES: "not writable", errno.EPERM: "not writable",
                 errno.EIO: "input/output error", errno.ESTALE: "gone (stale file handle)"}


def folder_problem(e: BaseException) -> str | None:
    """For an OSError that stops the run (FOLDER_ERRNOS), its short name; None otherwise."""
    return FOLDER_ERRNOS.get(e.errno) if isinstance(e, OSError) else None


def atomic_write(final: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through `write(fileobj)` to a temporary beside `final`, then rename over it.

    A reader sees the old file or the whole new one, never a part; a crash leaves only the
    temporary, which no reader trusts.
    """
    def produce(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return atomic_write_path(final, produce)


def atomic_write_path(final: str | os.PathLike, produce: Callable[[Path], None]) -> Path:
    """atomic_write for writers that need a file name rather than a file object (GDAL's COG driver).

    `produce(tmp)` creates the temporary `.<name>.<pid>.tmp` beside `final`; it is renamed over
    `final` only when `produce` returns, and removed when it raises.
    """
    final = Path(final)
    tmp = temporary_name(final)
    try:
        produce(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def atomic_write_text(final: str | os.PathLike, text: str) -> Path:
    """atomic_write of UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(final, lambda f: f.write(data))


# ---------------------------------------------------------------------------- process settings
# After `import terratorch`, the interpreter's own shutdown (tearing down thousands of modules) takes
# about 2.5 s on a 2-core machine: more than a whole batch of tiles. Once every output is written and
# closed, the entry points run the atexit handlers (logging, DataLoader workers, ...), flush stdio and
# leave with os._exit, skipping that teardown.
def exit_now(code: int | str | None) -> None:
    """Run atexit handlers, flush, and end the process with `code` (None means 0)."""
    code = 0 if code is None else code
    if not isinstance(code, int):     # sys.exit("message") semantics
        print(code, file=sys.stderr)
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def run_then_exit(main: Callable[[], object]) -> None:
    """`if __name__ == "__main__"` of a Hydra entry point: run it, then exit_now with its exit code.

    Hydra ends a config it cannot compose (unknown key, bad override) with exit 1, which stage2
    keeps for "some tiles failed": before the command has started, that is exit 2.
    """
    try:
        main()
    except SystemExit as e:
        exit_now(EXIT_RUN_ERROR if e.code == 1 and not _task_started else e.code)
    except KeyboardInterrupt:       # Ctrl-C outside the run itself (e.g. while Hydra composes)
        exit_now(EXIT_INTERRUPTED)
    exit_now(0)


def keep_freed_memory() -> bool:
    """glibc only: serve large CPU tensors from the heap and keep freed memory for the next batch.

    Why: torch's CPU allocator mallocs every activation afresh, and glibc maps large blocks from
    the kernel and unmaps them at free, so every forward page-faults its tens of MB of
    activations again (about 12,000 faults per batch of four 120 px tiles). Keeping them cut a
    120 px run's page faults from 528k to 338k and raised its steady throughput about 3.5 %
    (benchmarks/README.md). Peak memory is unchanged: the kept memory is reused, not added to.
    Same effect as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ or an allocator such as
    jemalloc. Returns False (and changes nothing) where the C library is not glibc.

    One arena for all threads (M_ARENA_MAX 1), because a thread's own arena grows in heaps of at
    most 64 MiB: an activation larger than that (a `cpu_streams` chunk of 8 tiles of 256 px: the
    decoder's 75 MB) is mapped and unmapped at every forward in that thread, whatever the
    threshold. prithvi_eo_tiny, 256 px, 2 streams: 8,641 page faults per tile for chunks of 8
    tiles, 0 with one arena (chunks of 4: 1 either way). torch's CPU allocations are few and large,
    so threads sharing the arena's lock do not wait on it.
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return (bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2 << 30))
            and bool(mallopt(m_arena_max, 1)))
