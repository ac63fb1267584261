"""`python -m stage2.predict checkpoint=... input_dir=... output_dir=...`: the Hydra entry point.

Order matters for users: check paths, find tiles, return at once if every tile is done (no torch,
no terratorch, no checkpoint load), then verify the checkpoint before any tile is read, then run
Lightning. Heavy imports happen only after the fast path.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from . import CONF_DIR, __version__
from .summary import RunSummary
from .tiles import discover, is_done, remove_stale_temporaries, tile_name

log = logging.getLogger("stage2")


class RunError(Exception):
    """A run-level problem: one line naming the path and what to do; exit code 2, nothing written."""


def _aoi_dir(data_root: str, kind: str, aoi: str | None) -> str | None:
    return None if aoi in (None, "", "None") else str(Path(data_root) / kind / str(aoi))


OmegaConf.register_new_resolver("stage2_aoi_dir", _aoi_dir, replace=True)


# ---------------------------------------------------------------------------- decisions
def resolve_precision(value: Any, on_gpu: bool, profile_amp: str) -> str:
    """Map the user's `precision` onto a Lightning precision string (SPEC 4)."""
    text = str(value).strip().lower()
    if text == "auto":
        if not on_gpu:
            return "32-true"
        if profile_amp.startswith("bf16"):
            import torch
            if not torch.cuda.is_bf16_supported():
                return "16-mixed"
        return profile_amp
    return {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}.get(text, text)


def uses_amp(precision: str) -> bool:
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
        log.warning("CUDA is not available: hardware=%s runs on the CPU in fp32", _profile_name())
        return "cpu"
    return wanted


def _profile_name() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        return str(HydraConfig.get().runtime.choices.get("hardware", "?"))
    except Exception:
        return "(profile)"


# ---------------------------------------------------------------------------- the run
def plan(cfg: DictConfig) -> tuple[Path, Path, list[Path], list[Path], int]:
    """Check run-level inputs; return input_dir, output_dir, tiles to do, ignored entries, done count."""
    if cfg.input_dir is None:
        raise RunError("input_dir is not set: pass input_dir=DIR (or aoi=NAME with data_root=DIR)")
    if cfg.output_dir is None:
        raise RunError("output_dir is not set: pass output_dir=DIR (or aoi=NAME with data_root=DIR)")
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        raise RunError("checkpoint is not set: pass checkpoint=PATH to a Stage 2 .pt or .ckpt file")
    input_dir, output_dir = Path(cfg.input_dir).expanduser(), Path(cfg.output_dir).expanduser()
    ckpt = Path(cfg.checkpoint).expanduser()
    if not ckpt.is_file():
        what = "does not exist" if not ckpt.exists() else "is not a file"
        raise RunError(f"checkpoint {ckpt} {what}: pass checkpoint=PATH to a Stage 2 .pt or .ckpt file")
    if not input_dir.is_dir():
        what = "does not exist" if not input_dir.exists() else "is not a directory"
        raise RunError(f"input_dir {input_dir} {what}: point input_dir at the folder of Stage 1 tiles")
    files, ignored = discover(input_dir, bool(cfg.recursive))
    for p in ignored:
        log.warning("ignored %s: named .npz but not a file", p)
    if not files:
        raise RunError(f"No NPZ tiles found in {input_dir}")
    if output_dir.resolve() == input_dir.resolve():
        raise RunError(f"output_dir {output_dir} is the input_dir: write Stage 2 outputs to another folder")
    todo = [f for f in files if not (cfg.skip_existing and is_done(output_dir, tile_name(f, input_dir)))]
    return input_dir, output_dir, todo, ignored, len(files) - len(todo)


def run(cfg: DictConfig, outcome: dict[str, Any] | None = None) -> int:
    """One Stage 2 run; returns the exit code (0 ok, 1 some tiles failed, 2 run-level error).

    `outcome`, when given, is filled with what a sweep report needs (the summary's counts, the
    error, or how many tiles were already done), so it never has to trust an older summary file.
    """
    t0 = time.perf_counter()
    outcome = {} if outcome is None else outcome
    try:
        return _run(cfg, t0, outcome)
    except RunError as e:
        outcome["error"] = str(e)
        if cfg.get("verbose"):
            raise
        print(f"stage2: error: {e}", file=sys.stderr)
        log.info("run-level error: %s", e)   # the log file; the console got the line above
        return 2


def _run(cfg: DictConfig, t0: float, outcome: dict[str, Any]) -> int:
    input_dir, output_dir, todo, ignored, done = plan(cfg)
    outcome["output_dir"] = str(output_dir)
    if not todo:
        remove_stale_temporaries(output_dir)
        msg = f"nothing to do: {done} tiles already done in {output_dir}"
        print(msg)
        log.info(msg)
        outcome["nothing_to_do"] = done
        return 0

    # Heavy imports only from here on.
    import warnings

    import lightning as L

    logging.getLogger("lightning").handlers.clear()   # Hydra's job_logging owns the console and log file
    from .checkpoint import CheckpointError, load_model
    from .data import TileDataModule
    from .distributed import distributed_scope
    from .module import Stage2Module
    from .progress import TileProgressBar
    from .writer import TileWriter, first_failures

    try:
        log.info("%d tiles to do, %d already done; imports took %.1f s", len(todo), done, time.perf_counter() - t0)
        model = load_model(Path(cfg.checkpoint).expanduser())
        log.info("checkpoint loaded (%s) at %.1f s", model.config["name"], time.perf_counter() - t0)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    accelerator = resolve_accelerator(cfg)
    precision = resolve_precision(cfg.precision, accelerator in ("gpu", "cuda"), str(cfg.hardware.amp_precision))

    dm = TileDataModule(todo, input_dir, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        pin_memory=cfg.pin_memory, patch_size=model.patch_size)
    processing = {
        "checkpoint": str(Path(cfg.checkpoint).expanduser().resolve()),
        "use_amp": uses_amp(precision),
        "precision": precision,
        "batch_size": int(cfg.batch_size),
        "model": model.config["name"],
        "stage2_version": __version__,
    }
    writer = TileWriter(output_dir, processing, quality=bool(cfg.quality), threads=cfg.writer_threads)
    bar = TileProgressBar(lambda tr: dm.tiles_on_rank(tr.global_rank, tr.world_size))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs.update(accelerator=accelerator, precision=precision)
    trainer = L.Trainer(**trainer_kwargs, callbacks=[writer, bar])
    module = Stage2Module(model, compile=bool(cfg.compile), cpu_streams=int(cfg.cpu_streams))
    # Lightning's notes about our own sampler and transfer hook are expected; set after terratorch's
    # import, which resets warning filters.
    for pattern in (".*custom batch sampler.*", ".*overridden `transfer_batch_to_device`.*", ".*LeafSpec.*",
                    ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=pattern)
    with distributed_scope():      # DDP children, env and process group live as long as this run
        try:
            log.info("trainer ready at %.1f s", time.perf_counter() - t0)
            trainer.predict(module, datamodule=dm, return_predictions=False)
            log.info("predict done at %.1f s", time.perf_counter() - t0)
        finally:
            writer.close()
        records, failures, tiles_per_s = writer.gathered(trainer)
    outcome["rank"] = trainer.global_rank
    if not trainer.is_global_zero:
        # Rank 0 reports the run and sets its exit code. A non-zero exit here would make
        # Lightning's process observer SIGKILL rank 0 before it writes the summary.
        return 0
    device = str(module.device) if trainer.world_size == 1 else f"{module.device.type} x {trainer.world_size}"
    from .summary import quality_summary
    summary = RunSummary(
        found=len(todo) + done, processed=len(records), skipped=done, failed=len(failures),
        ignored=len(ignored), metadata_defaults=sum(r.defaults for r in records),
        clipped=sum(r.clipped for r in records), cpu_fallbacks=sum(r.cpu_fallback for r in records),
        tiles_per_s=round(tiles_per_s, 3), wall_s=round(time.perf_counter() - t0, 3), device=device,
        precision=precision, batch_size=int(cfg.batch_size), model=model.config["name"],
        checkpoint=processing["checkpoint"], input_dir=str(input_dir), output_dir=str(output_dir),
        first_failures=first_failures(failures),
        quality=quality_summary(records) if cfg.quality else None, stage2_version=__version__,
    )
    summary.save(output_dir)
    outcome["summary"] = summary.to_json()
    text = summary.format()
    print(text)
    log.info("\n%s", text)
    return summary.exit_code()


# An absolute config path: works for `python -m`, console scripts and `from stage2.predict import main` alike.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> int | dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        code = run(cfg)
        if code:
            sys.exit(code)
        return code
    # One AOI of a sweep: never stop the sweep (no sys.exit, no exception out of here); hand the
    # outcome to stage2.sweep.SweepReport, which prints a line per AOI and sets the exit code.
    outcome: dict[str, Any] = {"aoi": cfg.get("aoi"), "input_dir": cfg.get("input_dir")}
    try:
        outcome["code"] = run(cfg, outcome)
    except Exception as e:  # a bug or an unexpected error in this AOI: log it, go on with the others
        log.exception("this AOI stopped with an unexpected error")
        outcome.update(code=1, error=f"unexpected {type(e).__name__}: {e} (traceback in the job log)")
    return outcome


if __name__ == "__main__":
    from .process import run_then_exit

    run_then_exit(main)
