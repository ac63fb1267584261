"""The train app: `python -m stage2.train optical_dir=DIR | pairs_dir=DIR [overrides]`.

Trains `Stage2Refiner` (the same model code predict runs) on (Stage 1 output, true optical)
pairs through Lightning, and writes:

- `<run dir>/checkpoints/*.ckpt`: Lightning's own checkpoints (best by validation loss, and
  `last.ckpt`), which `stage2.load_model` and `python -m stage2.predict` read as they are;
- the Stage 2 `.pt` of SPEC 6 (`stage2.save_checkpoint`) from the best checkpoint, at
  `output_checkpoint` (default `<run dir>/stage2_refiner.pt`);
- `<run dir>/csv/version_0/metrics.csv` (Lightning's CSVLogger) and the Hydra log.

A run is named steps: data (a bad folder or tile is reported before the model is built), model,
callbacks, fit, export. Loss and validation live in `stage2.train.module`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from .. import CONF_DIR
from ..runtime import (
    RunError,
    atomic_write_text,
    check_precision,
    exit_with,
    guarded,
    hydra_run_dir,
    resolve_accelerator,
    resolve_precision,
)

log = logging.getLogger("stage2")

BEST_PT = "stage2_refiner.pt"
SUMMARY_FILE = "train_summary.json"
VAL_KEYS = ("val_loss", "val_rmse_in", "val_rmse_out", "val_ndvi_rmse_in", "val_ndvi_rmse_out",
            "val_psnr_in", "val_psnr_out")
# The spread beside the means (stage2.train.scores): read where the log has them.
SPREAD_KEYS = ("val_ratio_median", "val_ratio_worst", "val_tiles_worse", "val_rmse_pooled_in",
               "val_rmse_pooled_out", "val_clean_change_mean", "val_clean_change_worst")
# Expected notes: our sampler is rank-aware itself.
EXPECTED_WARNINGS = (".*LeafSpec.*", ".*does not have many workers.*", ".*across ranks is zero.*")


def build_data(cfg: DictConfig) -> Any:
    """The PairDataModule of `cfg.data`, set up (every tile checked) before the model is built."""
    from hydra.utils import instantiate

    from .data import PairError
    from .degrade import load_params

    try:
        dm = instantiate(cfg.data)(degrade=load_params(cfg.degrade))
        dm.setup("fit")
    except (PairError, ValueError) as e:
        raise RunError(str(e)) from None
    return dm


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """A fresh Stage2Refiner from the `model` group, started from `model.pretrained_path` when set."""
    from ..model import build_model as build
    from .pretrained import PretrainedError, load_pretrained_encoder

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = build(model_cfg).train()
    path = model_cfg.get("pretrained_path")
    if path not in (None, ""):
        try:
            load_pretrained_encoder(model, path)
        except PretrainedError as e:
            raise RunError(str(e)) from None
    return model


def build_callbacks(cfg: DictConfig, run_dir: Path, has_val: bool) -> list[L.Callback]:
    """Checkpointing (best by val_loss, or the last weights without validation), early stop, encoder freeze,
    weight averaging."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from .module import FreezeEncoder

    ckpt_cb = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="epoch{epoch:03d}-step{step:06d}-val_loss{val_loss:.5f}",
        auto_insert_metric_name=False, monitor="val_loss" if has_val else None, mode="min",
        save_top_k=int(cfg.checkpoint.save_top_k) if has_val else 1, save_last=bool(cfg.checkpoint.save_last))
    callbacks: list[L.Callback] = [ckpt_cb]
    if cfg.early_stopping.enabled:
        if not has_val:
            raise RunError("early_stopping.enabled=true needs validation tiles: set data.val_fraction > 0")
        callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=int(cfg.early_stopping.patience),
                                       min_delta=float(cfg.early_stopping.min_delta)))
    if int(cfg.freeze_encoder_epochs) > 0:
        callbacks.append(FreezeEncoder(int(cfg.freeze_encoder_epochs)))
    if float(cfg.ema_decay) > 0:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        if not float(cfg.ema_decay) < 1:
            raise RunError(f"ema_decay={cfg.ema_decay}: use 0 (off) or a decay below 1, e.g. 0.99")
        # validation, checkpoints and the exported .pt all hold the averaged weights
        callbacks.append(EMAWeightAveraging(decay=float(cfg.ema_decay)))
    if not has_val:
        log.warning("no validation tiles (data.val_fraction=0 or a single tile): the last weights are kept")
    return callbacks


def fit(cfg: DictConfig, module: L.LightningModule, dm: Any, callbacks: list[L.Callback], run_dir: Path,
        accelerator: str, precision: str, resume: Path | None) -> L.Trainer:
    """Lightning's trainer.fit with the `trainer` group's settings; returns the trainer."""
    import warnings

    from lightning.pytorch.loggers import CSVLogger

    from ..distributed import distributed_scope

    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs.update(accelerator=accelerator, precision=precision, default_root_dir=str(run_dir))
    trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks, logger=CSVLogger(save_dir=str(run_dir), name="csv"))
    for pattern in EXPECTED_WARNINGS:     # set after terratorch's import, which resets the filters
        warnings.filterwarnings("ignore", message=pattern)
    with distributed_scope():      # DDP children, env and process group live as long as this run
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None)
    return trainer


def check_resume(cfg: DictConfig) -> Path | None:
    """The local Stage 2 .ckpt to resume from, checked (weights-only) before anything is built; RunError otherwise.

    A URL is refused: Lightning would download it and unpickle it.
    """
    from ..checkpoint import CheckpointError, read_checked

    value = cfg.get("resume_from")
    if value in (None, ""):
        return None
    if "://" in str(value):
        raise RunError(f"resume_from={value} is a URL: stage2 resumes only from a local .ckpt file (a remote "
                       "checkpoint would be downloaded and unpickled); copy it here and pass its path")
    path = Path(str(value)).expanduser()
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        raise RunError(f"resume_from {path} {what}: pass the .ckpt of an earlier run "
                       "(<its run dir>/checkpoints/last.ckpt)")
    try:
        read_checked(path)
    except CheckpointError as e:
        raise RunError(f"resume_from: {e}") from None
    return path


def best_overall(ckpt_cb: Any, module: L.LightningModule) -> str:
    """This run's best checkpoint, or the best of the runs it resumed when that is better and still on disk."""
    from .module import better

    best = ckpt_cb.best_model_path or ckpt_cb.last_model_path
    mine = {"path": best, "score": float(ckpt_cb.best_model_score)} if ckpt_cb.best_model_score is not None else None
    earlier = module.resumed_best
    if earlier is not None and not Path(earlier["path"]).is_file():
        log.warning("the best checkpoint before the resume (%s, val_loss %.5f) is gone: exporting this run's best",
                    earlier["path"], earlier["score"])
        earlier = None
    chosen = better(earlier, mine) if mine is not None else None
    if chosen is not None and chosen is earlier:
        log.info("the best checkpoint is from before the resume: %s (val_loss %.5f)", earlier["path"], earlier["score"])
    return chosen["path"] if chosen is not None else best


def export(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, run_dir: Path) -> tuple[str, Path]:
    """The Stage 2 .pt from the best Lightning checkpoint over every resumed run (read exactly as predict would)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ..checkpoint import load_model, save_checkpoint

    ckpt_cb = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint))
    best = best_overall(ckpt_cb, module)
    out = Path(cfg.output_checkpoint) if cfg.get("output_checkpoint") else run_dir / BEST_PT
    save_checkpoint(load_model(best) if best else module.model, out)
    return best, out


def validation_lines(score: dict[str, float], n_tiles: int) -> list[str]:
    """The held-out figures, the spread first: median and worst per-tile ratio, tiles made worse, pooled RMSE,
    clean tiles moved; then the means."""
    lines = []
    if "val_ratio_median" in score:
        lines.append(f"validation ({n_tiles} held-out tiles, best epoch): RMSE(output)/RMSE(input) per tile median "
                     f"x{score['val_ratio_median']:.3f}, worst x{score['val_ratio_worst']:.3f}, "
                     f"{score['val_tiles_worse']:.0f} worse by > 2 %; pooled RMSE {score['val_rmse_pooled_in']:.4f} -> "
                     f"{score['val_rmse_pooled_out']:.4f}")
    if "val_clean_change_mean" in score:
        lines.append(f"  clean held-out tiles moved by RMSE {score['val_clean_change_mean']:.4f} on average, "
                     f"{score['val_clean_change_worst']:.4f} at worst")
    lines.append(f"  means over tiles: RMSE {score['val_rmse_in']:.4f} -> {score['val_rmse_out']:.4f}, NDVI RMSE "
                 f"{score['val_ndvi_rmse_in']:.4f} -> {score['val_ndvi_rmse_out']:.4f}, PSNR "
                 f"{score['val_psnr_in']:.2f} -> {score['val_psnr_out']:.2f} dB")
    return lines


def summarise(trainer: L.Trainer, dm: Any, module: L.LightningModule, best: str, out: Path, run_dir: Path,
              t0: float, accelerator: str, precision: str) -> None:
    """Print the result (with the held-out validation figures) and save train_summary.json."""
    lines = [f"stage2 training done in {time.perf_counter() - t0:.0f} s: {trainer.global_step} steps, "
             f"{trainer.current_epoch} epochs, {len(dm.train_sources)} training tiles, "
             f"{len(dm.val_sources)} validation tiles, {precision} on {accelerator}"]
    score = best_scores(Path(trainer.logger.log_dir) / "metrics.csv")
    if score:
        lines += validation_lines(score, len(dm.val_sources))
    lines += [f"Lightning checkpoint: {best or '(none)'}", f"Stage 2 checkpoint: {out}",
              f"metrics: {trainer.logger.log_dir}/metrics.csv"]
    print("\n".join(lines))
    summary = {"steps": int(trainer.global_step), "epochs": int(trainer.current_epoch),
               "wall_s": round(time.perf_counter() - t0, 1), "device": accelerator, "precision": precision,
               "train_tiles": [s.name for s in dm.train_sources], "val_tiles": [s.name for s in dm.val_sources],
               "best_validation": score, "conditioning": module.model.conditioning,
               "lightning_checkpoint": best or None, "stage2_checkpoint": str(out)}
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def best_scores(metrics_csv: Path) -> dict[str, float] | None:
    """The validation figures of the epoch whose checkpoint was kept, from the CSV log."""
    import csv

    if not metrics_csv.is_file():
        return None
    with metrics_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if all(r.get(k) not in (None, "") for k in VAL_KEYS)]
    if not rows:
        return None
    best = min(rows, key=lambda r: float(r["val_loss"]))
    return {k: float(best[k]) for k in (*VAL_KEYS, *SPREAD_KEYS) if best.get(k) not in (None, "")}


def run(cfg: DictConfig) -> int:
    """One training run; returns the exit code (0 ok, 2 a run-level problem, 130 Ctrl-C)."""
    return guarded(lambda: _steps(cfg), cfg)


def _steps(cfg: DictConfig) -> int:
    from .module import RefinerTrainModule

    t0 = time.perf_counter()
    run_dir = hydra_run_dir()
    logging.getLogger("lightning").handlers.clear()   # Hydra's job_logging owns the console and log file
    check_precision(cfg.precision)
    resume = check_resume(cfg)
    accelerator = resolve_accelerator(cfg)
    precision = resolve_precision(cfg.precision, accelerator in ("gpu", "cuda"), str(cfg.hardware.amp_precision))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm = build_data(cfg)
    model = build_model(cfg)
    if dm.crop % model.patch_size:
        raise RunError(f"data.crop={dm.crop} is not a multiple of the model's patch size {model.patch_size}")
    module = RefinerTrainModule(model, loss=OmegaConf.to_container(cfg.loss, resolve=True),
                                optim=OmegaConf.to_container(cfg.optim, resolve=True),
                                pretrained_path=cfg.model.get("pretrained_path"), conditioning=dm.condition_record())
    callbacks = build_callbacks(cfg, run_dir, bool(dm.val_sources))
    trainer = fit(cfg, module, dm, callbacks, run_dir, accelerator, precision, resume)
    if not trainer.is_global_zero:
        return 0
    best, out = export(cfg, trainer, module, run_dir)
    summarise(trainer, dm, module, best, out, run_dir, t0, accelerator, precision)
    return 0


# An absolute config path: works for `python -m`, console scripts and `from stage2.train.app import main`.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> int:
    return exit_with(run(cfg))
