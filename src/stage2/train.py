"""`python -m stage2.train optical_dir=DIR | pairs_dir=DIR [overrides]`: fine-tune the refiner.

Trains `Stage2Refiner` (the same model code predict runs) on (Stage 1 output, true optical)
pairs through Lightning, and writes:

- `<run dir>/checkpoints/*.ckpt`: Lightning's own checkpoints (best by validation loss, and
  `last.ckpt`), which `stage2.load_model` and `python -m stage2.predict` read as they are;
- the Stage 2 `.pt` of SPEC 6 (`stage2.save_checkpoint`) from the best checkpoint, at
  `output_checkpoint` (default `<run dir>/stage2_refiner.pt`);
- `<run dir>/csv/version_0/metrics.csv` (Lightning's CSVLogger) and the Hydra log.

Loss: L1 on reflectance plus `loss.ndvi_weight` x L1 on NDVI. Validation scores whole held-out
tiles with `stage2.evaluate.compare` (RMSE, PSNR, NDVI RMSE, edge preservation) for the input
(`*_in`: opt_v1 against the truth) and the output (`*_out`: opt_v2 against the truth), so the
gain is on screen while training.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from . import CONF_DIR
from .checkpoint import FORMAT_VERSION, MARKER
from .predict import RunError, resolve_accelerator, resolve_precision

log = logging.getLogger("stage2")

BEST_PT = "stage2_refiner.pt"
SUMMARY_FILE = "train_summary.json"


def ndvi_torch(x: torch.Tensor, floor: float) -> torch.Tensor:
    """NDVI of (B, 4, H, W) with the denominator floored at `floor`.

    Over dark water NIR + red is near 0 and true NDVI is mostly noise; the floor keeps those
    pixels from dominating the loss and its gradients.
    """
    red, nir = x[:, 2], x[:, 3]
    return (nir - red) / (nir + red).clamp_min(floor)


class RefinerTrainModule(L.LightningModule):
    """Stage2Refiner under training. Holds the model as `self.model` and saves plain hyperparameters
    with the Stage 2 marker, so its Lightning `.ckpt` files are Stage 2 checkpoints (checkpoint.py)."""

    def __init__(self, model: torch.nn.Module, loss: Mapping[str, Any] | None = None,
                 optim: Mapping[str, Any] | None = None, pretrained_path: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_cfg = {"l1_weight": 1.0, "ndvi_weight": 0.1, "ndvi_floor": 0.05, **dict(loss or {})}
        self.optim_cfg = {"lr": 2e-3, "weight_decay": 0.01, "warmup_steps": 30, "min_lr_ratio": 0.02,
                          **dict(optim or {})}
        # Plain python types only: torch.load(weights_only=True) must read the .ckpt.
        self.save_hyperparameters({
            MARKER: FORMAT_VERSION,
            "model_config": dict(model.config),
            "loss": {k: float(v) for k, v in self.loss_cfg.items()},
            "optim": {k: float(v) for k, v in self.optim_cfg.items()},
            "pretrained_path": None if pretrained_path is None else str(pretrained_path),
        })

    def forward(self, opt_v1: torch.Tensor, month: torch.Tensor, biome: torch.Tensor) -> torch.Tensor:
        return self.model(opt_v1, month, biome)

    def compute_loss(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, l1, ndvi L1) of a batch; computed in fp32 whatever the autocast precision."""
        out, target = out.float(), target.float()
        l1 = (out - target).abs().mean()
        floor = self.loss_cfg["ndvi_floor"]
        nd = (ndvi_torch(out, floor) - ndvi_torch(target, floor)).abs().mean()
        return self.loss_cfg["l1_weight"] * l1 + self.loss_cfg["ndvi_weight"] * nd, l1, nd

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(batch["opt_v1"], batch["month"], batch["biome"])
        loss, l1, nd = self.compute_loss(out, batch["target"])
        n = batch["opt_v1"].shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({"train_l1": l1, "train_ndvi_l1": nd}, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from .evaluate import compare

        v1, target = batch["opt_v1"], batch["target"]
        out = self.model(v1, batch["month"], batch["biome"])
        loss, _, _ = self.compute_loss(out, target)
        self.log("val_loss", loss, prog_bar=True, batch_size=1, sync_dist=True)
        truth = target[0].float().cpu().numpy()
        scores = {"in": compare(truth, v1[0].float().cpu().numpy()), "out": compare(truth, out[0].float().cpu().numpy())}
        for side, metrics in scores.items():
            for name, value in metrics.items():
                if value is not None and math.isfinite(value):
                    self.log(f"val_{name}_{side}", float(value), batch_size=1, sync_dist=True,
                             prog_bar=name == "rmse")

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no weight decay on biases, norms and embeddings), linear warm-up, cosine decay."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim <= 1 or "embed" in name or "token" in name else decay).append(p)
        cfg = self.optim_cfg
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"])
        total = self.trainer.estimated_stepping_batches
        warm, floor = max(int(cfg["warmup_steps"]), 0), float(cfg["min_lr_ratio"])

        def factor(step: int) -> float:
            w = min(1.0, (step + 1) / warm) if warm else 1.0
            if not math.isfinite(total) or total <= 0:       # only max_time bounds the run: no decay
                return w
            progress = min(step / total, 1.0)
            return w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FreezeEncoder(L.Callback):
    """Keep the Prithvi encoder fixed for the first `epochs` epochs, then train it too.

    With pretrained weights this lets the fresh decoder and embeddings settle before their
    gradients reach the encoder. Frozen parameters get no gradient, which AdamW skips. (Under DDP
    use strategy=ddp_find_unused_parameters_true while the encoder is frozen.)
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = int(epochs)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        frozen = trainer.current_epoch < self.epochs
        encoder = pl_module.model.encoder
        if any(p.requires_grad == frozen for p in encoder.parameters()):
            encoder.requires_grad_(not frozen)
            log.info("epoch %d: encoder %s", trainer.current_epoch, "frozen" if frozen else "trainable")


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """A fresh Stage2Refiner from the `model` group, started from `model.pretrained_path` when set."""
    from .model import build_model as build
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


def run(cfg: DictConfig) -> int:
    """One training run; returns the exit code (0 ok, 2 a run-level problem)."""
    try:
        return _run(cfg)
    except RunError as e:
        if cfg.get("verbose"):
            raise
        print(f"stage2: error: {e}", file=sys.stderr)
        log.info("run-level error: %s", e)   # the log file; the console got the line above
        return 2


def _run_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path.cwd()


def _run(cfg: DictConfig) -> int:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .checkpoint import load_model, save_checkpoint
    from .distributed import distributed_scope
    from .train_data import PairDataModule, PairError

    t0 = time.perf_counter()
    run_dir = _run_dir()
    logging.getLogger("lightning").handlers.clear()   # Hydra's job_logging owns the console and log file
    accelerator = resolve_accelerator(cfg)
    precision = resolve_precision(cfg.precision, accelerator in ("gpu", "cuda"), str(cfg.hardware.amp_precision))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    # The data first: a wrong folder or a bad tile is reported before the model is built.
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    try:
        dm = PairDataModule(pairs_dir=cfg.pairs_dir, optical_dir=cfg.optical_dir, seed=int(cfg.seed),
                            degrade=OmegaConf.to_container(cfg.degrade, resolve=True) or None, **data_cfg)
        dm.setup("fit")
    except (PairError, ValueError) as e:
        raise RunError(str(e)) from None
    model = build_model(cfg)
    if dm.crop % model.patch_size:
        raise RunError(f"data.crop={dm.crop} is not a multiple of the model's patch size {model.patch_size}")

    module = RefinerTrainModule(model, loss=OmegaConf.to_container(cfg.loss, resolve=True),
                                optim=OmegaConf.to_container(cfg.optim, resolve=True),
                                pretrained_path=cfg.model.get("pretrained_path"))
    has_val = bool(dm.val_sources)
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
    if not has_val:
        log.warning("no validation tiles (data.val_fraction=0 or a single tile): the last weights are kept")

    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs.update(accelerator=accelerator, precision=precision, default_root_dir=str(run_dir))
    trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks,
                        logger=CSVLogger(save_dir=str(run_dir), name="csv"))
    # Expected notes: our sampler is rank-aware itself; set after terratorch's import resets the filters.
    for pattern in (".*LeafSpec.*", ".*does not have many workers.*", ".*across ranks is zero.*"):
        warnings.filterwarnings("ignore", message=pattern)
    with distributed_scope():      # DDP children, env and process group live as long as this run
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("resume_from"))

    if not trainer.is_global_zero:
        return 0
    best = ckpt_cb.best_model_path or ckpt_cb.last_model_path
    out = Path(cfg.output_checkpoint) if cfg.get("output_checkpoint") else run_dir / BEST_PT
    if best:
        save_checkpoint(load_model(best), out)     # reads the Lightning .ckpt exactly as predict would
    else:
        save_checkpoint(module.model, out)
    lines = [f"stage2 training done in {time.perf_counter() - t0:.0f} s: {trainer.global_step} steps, "
             f"{trainer.current_epoch} epochs, {len(dm.train_sources)} training tiles, "
             f"{len(dm.val_sources)} validation tiles, {precision} on {accelerator}"]
    score = _best_scores(trainer)
    if score:
        lines.append(f"validation (held-out tiles, best epoch): RMSE {score['val_rmse_in']:.4f} -> "
                     f"{score['val_rmse_out']:.4f}, NDVI RMSE {score['val_ndvi_rmse_in']:.4f} -> "
                     f"{score['val_ndvi_rmse_out']:.4f}, PSNR {score['val_psnr_in']:.2f} -> {score['val_psnr_out']:.2f} dB")
    lines += [f"Lightning checkpoint: {best or '(none)'}", f"Stage 2 checkpoint: {out}",
              f"metrics: {trainer.logger.log_dir}/metrics.csv"]
    print("\n".join(lines))
    summary = {"steps": int(trainer.global_step), "epochs": int(trainer.current_epoch),
               "wall_s": round(time.perf_counter() - t0, 1), "device": accelerator, "precision": precision,
               "train_tiles": [s.name for s in dm.train_sources], "val_tiles": [s.name for s in dm.val_sources],
               "best_validation": score, "lightning_checkpoint": best or None, "stage2_checkpoint": str(out)}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _best_scores(trainer: L.Trainer) -> dict[str, float] | None:
    """The validation figures of the epoch whose checkpoint was kept, from the CSV log."""
    import csv

    path = Path(trainer.logger.log_dir) / "metrics.csv"
    keys = ("val_loss", "val_rmse_in", "val_rmse_out", "val_ndvi_rmse_in", "val_ndvi_rmse_out",
            "val_psnr_in", "val_psnr_out")
    if not path.is_file():
        return None
    rows = [r for r in csv.DictReader(path.open()) if all(r.get(k) not in (None, "") for k in keys)]
    if not rows:
        return None
    best = min(rows, key=lambda r: float(r["val_loss"]))
    return {k: float(best[k]) for k in keys}


# An absolute config path: works for `python -m`, console scripts and `from stage2.train import main` alike.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> int:
    code = run(cfg)
    if code:
        sys.exit(code)
    return code


if __name__ == "__main__":
    from .process import run_then_exit

    run_then_exit(main)
