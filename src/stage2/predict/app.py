"""The predict app: `python -m stage2.predict checkpoint=... input_dir=... output_dir=...` (docs/usage.md#running).

A run is named steps, in the order users need them:
- plan: check settings and paths (nothing is written; no torch, no terratorch);
- lock the output folder (one run per folder, stage2.store.lock), then trust: find the tiles,
  fingerprint the checkpoint and decide which outputs a rerun may keep (stage2.predict.resume);
- build: load and verify the checkpoint before any tile is read, then instantiate the data
  module, writer and module from the config;
- execute: Lightning's `trainer.predict`, with the DDP state scoped to this run;
- summarise: one screen and `_stage2_summary.json`, and the exit code. A run that stops
  part-way (exit 3) or is interrupted (130) still writes its summary, and says so in one line.
A finished AOI returns after `trust` ("nothing to do"), without heavy imports.
input_dir and output_dir may be local folders or fsspec URLs: the run reaches both through their
stores (stage2.store), so locking, rerun trust and the run's own files are the same code for both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from .. import CONF_DIR, __version__
from ..runtime import (
    EXIT_STOPPED,
    RunError,
    RunInterrupted,
    RunStopped,
    exit_with,
    first_line,
    folder_problem,
    guarded,
    interrupted_by_signal,
    register_resolvers,
)
from ..store import SUMMARY_FILE, is_url, location, open_store
from .plan import Plan
from .preflight import check_locations, check_settings

if TYPE_CHECKING:
    from .summary import RunSummary

log = logging.getLogger("stage2")
register_resolvers()

# Lightning's notes about our own sampler and transfer hook are expected.
EXPECTED_WARNINGS = (".*custom batch sampler.*", ".*overridden `transfer_batch_to_device`.*", ".*LeafSpec.*",
                     ".*does not have many workers.*")


@dataclass
class Parts:
    """The objects of one run, built from the config."""

    trainer: Any
    module: Any
    data: Any
    writer: Any
    processing: dict[str, Any]


# ---------------------------------------------------------------------------- plan
def _required_paths(cfg: DictConfig) -> tuple[Path | str, Path | str, Path]:
    if cfg.input_dir is None:
        raise RunError("input_dir is not set: pass input_dir=DIR (or aoi=NAME with data_root=DIR)")
    if cfg.output_dir is None:
        raise RunError("output_dir is not set: pass output_dir=DIR (or aoi=NAME with data_root=DIR)")
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        raise RunError("checkpoint is not set: pass checkpoint=PATH to a Stage 2 .pt or .ckpt file")
    return location(cfg.input_dir), location(cfg.output_dir), Path(cfg.checkpoint).expanduser()


def plan(cfg: DictConfig) -> Plan:
    """Check settings and paths; nothing is read or written (every problem: RunError, exit 2).
    The tiles are found under the lock (resume.trust), from the same listing that decides what is done."""
    input_dir, output_dir, ckpt = _required_paths(cfg)
    check_settings(cfg)
    if not ckpt.is_file():
        what = "does not exist" if not ckpt.exists() else "is not a file"
        raise RunError(f"checkpoint {ckpt} {what}: pass checkpoint=PATH to a Stage 2 .pt or .ckpt file")
    check_locations(input_dir, output_dir)
    return Plan(input_dir, output_dir, ckpt, inputs=open_store(input_dir), outputs=open_store(output_dir))


def nothing_to_do(cfg: DictConfig, p: Plan, outcome: dict[str, Any]) -> int:
    """The fast path of a finished AOI: no model, no checkpoint load; the hand-off files are rebuilt
    only when they no longer describe the folder's outputs."""
    from . import handoff
    from .resume import finish

    p.outputs.clean_temporaries()
    finish(p, [], None)
    if cfg.catalog and not handoff.is_current(p):
        recorded = (p.previous_summary or {}) | handoff.rebuild(p, [])
        p.outputs.write_json(SUMMARY_FILE, recorded)
    msg = f"nothing to do: {p.done} tiles already done in {p.output_dir}"
    print(msg)
    log.info(msg)
    outcome["nothing_to_do"] = p.done
    return 0


# ---------------------------------------------------------------------------- build
def load_checked_model(checkpoint: Path) -> Any:
    """The checkpoint's model, or a RunError naming the file and the problem."""
    from ..checkpoint import CheckpointError, load_model

    try:
        return load_model(checkpoint)
    except CheckpointError as e:
        raise RunError(str(e)) from None


def build(cfg: DictConfig, p: Plan, model: Any) -> Parts:
    """Trainer, module, data module and writer for this run; the config describes each of them."""
    import lightning as L
    from hydra.utils import instantiate

    from ..runtime import resolve_accelerator, resolve_precision, uses_amp
    from .progress import TileProgressBar

    accelerator = resolve_accelerator(cfg)
    precision = resolve_precision(cfg.precision, accelerator in ("gpu", "cuda"), str(cfg.hardware.amp_precision))
    data = instantiate(cfg.data)(files=p.todo, input_dir=p.input_dir, patch_size=model.patch_size,
                                 clashes=p.clashes, states=p.states, conditioning=model.conditioning)
    processing = {
        "checkpoint": str(p.checkpoint.resolve()),
        "checkpoint_sha256": p.fingerprint["sha256"],
        "use_amp": uses_amp(precision),
        "precision": precision,
        "batch_size": int(cfg.batch_size),
        "model": model.config["name"],
        "stage2_version": __version__,
    }
    writer = instantiate(cfg.writer)(store=p.outputs, processing=processing)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs.update(accelerator=accelerator, precision=precision)
    callbacks = [writer]
    if trainer_kwargs.get("enable_progress_bar", True):    # Lightning refuses a bar callback when it is off
        callbacks.append(TileProgressBar(lambda tr: data.tiles_on_rank(tr.global_rank, tr.world_size)))
    trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks)
    module = instantiate(cfg.module)(model=model)
    return Parts(trainer, module, data, writer, processing)


# ---------------------------------------------------------------------------- execute
def execute(parts: Parts, t0: float) -> tuple[list[Any], list[dict[str, str]], float]:
    """trainer.predict over the data; returns records, failures and tiles/s gathered over all ranks."""
    import warnings

    from ..distributed import distributed_scope

    for pattern in EXPECTED_WARNINGS:     # set after terratorch's import, which resets warning filters
        warnings.filterwarnings("ignore", message=pattern)
    with distributed_scope():      # DDP children, env and process group live as long as this run
        try:
            log.info("trainer ready at %.1f s", time.perf_counter() - t0)
            parts.trainer.predict(parts.module, datamodule=parts.data, return_predictions=False)
            log.info("predict done at %.1f s", time.perf_counter() - t0)
        finally:
            parts.writer.close()
        return parts.writer.gathered(parts.trainer)


# ---------------------------------------------------------------------------- summarise
def make_summary(cfg: DictConfig, p: Plan, parts: Parts, result: tuple[list[Any], list[dict[str, str]], float],
                 t0: float, **status: Any) -> RunSummary:
    """The RunSummary of this run (`status`: stopped=<reason> or interrupted=True for a run cut short)."""
    from .summary import RunSummary, confidence_summary, quality_summary
    from .writer import first_failures

    records, failures, tiles_per_s = result
    trainer, module = parts.trainer, parts.module
    device = str(module.device) if trainer.world_size == 1 else f"{module.device.type} x {trainer.world_size}"
    return RunSummary(
        found=len(p.files), processed=len(records), skipped=p.done, failed=len(failures),
        ignored=len(p.ignored), redone_stale=p.stale, metadata_defaults=sum(r.defaults for r in records),
        unseen_conditions=sum(r.unseen_conditions for r in records),
        missing_conditions=sum(r.missing_conditions for r in records),
        clipped=sum(r.clipped for r in records), cpu_fallbacks=sum(r.cpu_fallback for r in records),
        not_georeferenced=sum(not r.georeferenced for r in records),
        tiles_per_s=round(tiles_per_s, 3), wall_s=round(time.perf_counter() - t0, 3), device=device,
        precision=parts.processing["precision"], batch_size=int(cfg.batch_size),
        model=parts.processing["model"], checkpoint=parts.processing["checkpoint"],
        checkpoint_sha256=p.fingerprint["sha256"], checkpoint_fingerprint=p.fingerprint, input_dir=str(p.input_dir),
        output_dir=str(p.output_dir), first_failures=first_failures(failures),
        quality=quality_summary(records) if cfg.quality else None,
        confidence=confidence_summary(records, parts.processing["tta"]), stage2_version=__version__, **status,
    )


def summarise(cfg: DictConfig, p: Plan, parts: Parts, result: tuple[list[Any], list[dict[str, str]], float],
              t0: float, outcome: dict[str, Any]) -> int:
    """Rebuild the hand-off files, print and save the run summary (rank 0); return the exit code."""
    from . import handoff
    from .resume import finish

    summary = make_summary(cfg, p, parts, result, t0)
    written = [r.name for r in result[0]]
    try:
        finish(p, written, result[1])
        if cfg.catalog:
            recorded = handoff.rebuild(p, written)
            summary.band_stats, summary.handoff = recorded["band_stats"], recorded["handoff"]
        summary.save(p.outputs)
    except RunError as e:       # the bucket went away after the tiles were written: not a "nothing written" 2
        log.info("\n%s", summary.format())
        raise RunStopped(f"{e}: {summary.progress_line()} (summary not written; the log has it)") from None
    outcome["summary"] = summary.to_json()
    text = summary.format()
    print(text)
    log.info("\n%s", text)
    return summary.exit_code()


def cut_short(cfg: DictConfig, p: Plan, parts: Parts, t0: float, outcome: dict[str, Any],
              error: BaseException) -> NoReturn:
    """The run stopped part-way (exit 3) or was interrupted (130): save what was done, then raise for one line.

    Rank 0 writes the summary from its own counts (gathering from other ranks could wait forever
    on a rank that is gone). The console gets one line; the traceback goes to the log (guarded).
    """
    from .resume import finish

    interrupted = isinstance(error, KeyboardInterrupt) or interrupted_by_signal()
    if isinstance(error, SystemExit) and not interrupted:
        raise error
    reason = None if interrupted else stop_reason(error, p.output_dir)
    if not parts.trainer.is_global_zero:
        raise (RunInterrupted() if interrupted else RunStopped(reason)) from error
    writer = parts.writer
    local = (list(writer.records), list(writer.failures), writer.steady_tiles_per_s())
    summary = make_summary(cfg, p, parts, local, t0, stopped=reason, interrupted=interrupted)
    outcome["summary"] = summary.to_json()
    log.info("\n%s", summary.format())
    try:
        finish(p, [r.name for r in local[0]], local[1])
        saved = f"summary in {summary.save(p.outputs)}"
    except OSError as e:
        saved = f"summary not written ({e.strerror}); the log has it"
    except RunError as e:
        saved = f"summary not written ({e}); the log has it"
    line = f"{summary.progress_line()} ({saved})"
    if interrupted:
        raise RunInterrupted(line) from error
    raise RunStopped(f"{reason}: {line}") from error


def stop_reason(error: BaseException, output_dir: Path | str) -> str:
    """What stopped the run, in words: the output folder's problem, or the unexpected error."""
    if isinstance(error, RunError):         # a bucket refused or vanished mid-run (stage2.store)
        return first_line(error)
    if is_url(output_dir):
        return f"unexpected {type(error).__name__}: {first_line(error)}"
    problem = folder_problem(error)
    if problem is not None and not output_dir.is_dir():
        return f"the output folder {output_dir} is gone"
    if problem is not None:
        return f"{problem} ({error.strerror}) writing to {output_dir}"
    return f"unexpected {type(error).__name__}: {first_line(error)}"


# ---------------------------------------------------------------------------- the run
def run(cfg: DictConfig, outcome: dict[str, Any] | None = None) -> int:
    """One Stage 2 run; returns the exit code (docs/usage.md#errors: 0 ok, 1 some tiles failed, 2 run-level error,
    3 stopped part-way, 130 interrupted).

    `outcome`, when given, is filled with what a sweep report needs (the summary's counts, the
    error, or how many tiles were already done), so it never has to trust an older summary file.
    """
    outcome = {} if outcome is None else outcome
    return guarded(lambda: _steps(cfg, outcome), cfg, outcome=outcome)


def _steps(cfg: DictConfig, outcome: dict[str, Any]) -> int:
    t0 = time.perf_counter()
    p = plan(cfg)
    outcome["output_dir"] = str(p.output_dir)
    from .resume import trust

    with p.outputs.lock():
        trust(cfg, p)
        if not p.todo:
            return nothing_to_do(cfg, p, outcome)
        return _predict(cfg, p, t0, outcome)


def _predict(cfg: DictConfig, p: Plan, t0: float, outcome: dict[str, Any]) -> int:
    from .handoff import withdraw
    from .resume import discard

    logging.getLogger("lightning").handlers.clear()   # Hydra's job_logging owns the console and log file
    log.info("%d tiles to do, %d already done; %.1f s", len(p.todo), p.done, time.perf_counter() - t0)
    model = load_checked_model(p.checkpoint)
    log.info("checkpoint loaded (%s) at %.1f s", model.config["name"], time.perf_counter() - t0)
    parts = build(cfg, p, model)
    if parts.trainer.is_global_zero:
        # the first change to outputs: every run-level check has passed
        if p.untrusted:
            withdraw(p)         # no catalog may name an output while it is being redone
        discard(p)
    try:
        result = execute(parts, t0)
    except BaseException as e:
        cut_short(cfg, p, parts, t0, outcome, e)
    outcome["rank"] = parts.trainer.global_rank
    if not parts.trainer.is_global_zero:
        # Rank 0 reports the run and sets its exit code. A non-zero exit here would make
        # Lightning's process observer SIGKILL rank 0 before it writes the summary.
        return 0
    return summarise(cfg, p, parts, result, t0, outcome)


def sweep_job(cfg: DictConfig) -> dict[str, Any]:
    """One AOI of a sweep: never stops the sweep (no sys.exit, no exception out of here).

    The outcome goes to stage2.predict.sweep.SweepReport, which prints a line per AOI and sets the
    sweep's exit code.
    """
    outcome: dict[str, Any] = {"aoi": cfg.get("aoi"), "input_dir": cfg.get("input_dir")}
    try:
        outcome["code"] = run(cfg, outcome)
    except Exception as e:  # a bug or an unexpected error in this AOI: log it, go on with the others
        log.exception("this AOI stopped with an unexpected error")
        outcome.update(code=EXIT_STOPPED, error=f"unexpected {type(e).__name__}: {e} (traceback in the job log)")
    return outcome


# An absolute config path: works for `python -m`, console scripts and `from stage2.predict.app import main`.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> int | dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep_job(cfg)
    return exit_with(run(cfg))
