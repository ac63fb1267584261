"""The LightningModule of training: Stage2Refiner, its loss, validation scores and optimiser.

Its Lightning `.ckpt` files are Stage 2 checkpoints (stage2.checkpoint reads them): the module
saves plain hyperparameters with the Stage 2 marker and the model's config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from ..checkpoint import CONDITIONING_KEY, FORMAT_VERSION, MARKER
from ..quality import compare
from .scores import tile_errors, validation_scores

log = logging.getLogger("stage2")

# The best checkpoint of every run a chain of resumes went through, saved in each checkpoint as
# {"path": str, "score": float} (plain types: weights-only loading reads it). Lightning's
# ModelCheckpoint forgets the best score of a resumed run when the run dir changes (a new Hydra
# run dir every time), so without it the exported .pt would be the best since the last resume.
BEST_KEY = "stage2_best"


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

    def __init__(self, model: torch.nn.Module, *, loss: Mapping[str, Any], optim: Mapping[str, Any],
                 pretrained_path: str | None, conditioning: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        # l1_weight, ndvi_weight, ndvi_floor, clean_weight, clean_scale, clean_warmup (conf/train.yaml)
        self.loss_cfg = {"clean_weight": 0.0, "clean_scale": 0.0, "clean_warmup": 0.0, **loss}
        self.optim_cfg = dict(optim)    # lr, weight_decay, warmup_steps, min_lr_ratio
        # The months and biomes trained on (stage2.checkpoint.conditioning_record): in every .ckpt and .pt.
        model.conditioning = None if conditioning is None else dict(conditioning)
        self._val_tiles: list[dict[str, Any]] = []
        # Plain python types only: torch.load(weights_only=True) must read the .ckpt.
        self.save_hyperparameters({
            MARKER: FORMAT_VERSION,
            "model_config": dict(model.config),
            "loss": {k: float(v) for k, v in self.loss_cfg.items()},
            "optim": {k: float(v) for k, v in self.optim_cfg.items()},
            "pretrained_path": None if pretrained_path is None else str(pretrained_path),
            CONDITIONING_KEY: model.conditioning,
        })

    def forward(self, opt_v1: torch.Tensor, month: torch.Tensor, biome: torch.Tensor) -> torch.Tensor:
        return self.model(opt_v1, month, biome)

    # ------------------------------------------------------------------ best over resumes
    resumed_best: dict[str, Any] | None = None      # the best of the runs this one resumed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.resumed_best = recorded_best(checkpoint)
        with_unknown_month_moments(checkpoint, self.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[BEST_KEY] = better(self.resumed_best, run_best(checkpoint))

    def compute_loss(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, l1, ndvi L1) of a batch; computed in fp32 whatever the autocast precision."""
        out, target = out.float(), target.float()
        l1 = (out - target).abs().mean()
        floor = self.loss_cfg["ndvi_floor"]
        nd = (ndvi_torch(out, floor) - ndvi_torch(target, floor)).abs().mean()
        return self.loss_cfg["l1_weight"] * l1 + self.loss_cfg["ndvi_weight"] * nd, l1, nd

    def clean_penalty(self, out: torch.Tensor, v1: torch.Tensor, clean: torch.Tensor | None) -> torch.Tensor:
        """The correction of the batch's clean samples (input = truth), averaged over the whole batch.

        On a clean sample the L1 loss already is |correction|; `loss.clean_weight` adds this much more.
        Per pixel |c| (`loss.clean_scale` 0), or c^2 / clean_scale: equal to |c| at |c| = clean_scale,
        less below it, more above. Why the quadratic form: where the model cannot yet tell clean from
        degraded, an L1 term pulls every correction to exactly zero once the weighted clean share
        outweighs the degraded one (and the refiner learns nothing), or lets it correct everything
        when it does not; c^2 lets small, bounded corrections through and stops large ones.
        """
        if clean is None or not self.loss_cfg["clean_weight"]:
            return out.new_zeros(())
        c = out.float() - v1.float()
        scale = float(self.loss_cfg["clean_scale"])
        per_pixel = c * c / scale if scale > 0 else c.abs()
        return (per_pixel.mean(dim=(1, 2, 3)) * clean.float()).mean()

    def clean_weight_now(self) -> float:
        """`loss.clean_weight`, reached linearly over the first `loss.clean_warmup` share of the training steps.

        Why a warm-up: at full weight from the start the refiner never learns a correction worth keeping
        (the penalty wins before it can tell clean from degraded); first it learns the corrections, then
        where not to make them.
        """
        weight, warmup = float(self.loss_cfg["clean_weight"]), float(self.loss_cfg["clean_warmup"])
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if warmup <= 0 or not math.isfinite(total) or total <= 0:
            return weight
        return weight * min(1.0, self.global_step / (warmup * total))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(batch["opt_v1"], batch["month"], batch["biome"])
        loss, l1, nd = self.compute_loss(out, batch["target"])
        penalty = self.clean_penalty(out, batch["opt_v1"], batch.get("clean"))
        loss = loss + self.clean_weight_now() * penalty
        n = batch["opt_v1"].shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({"train_l1": l1, "train_ndvi_l1": nd, "train_clean_change": penalty}, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """A held-out tile, degraded (loss and scores) or clean (how far the refiner moves it)."""
        v1, target = batch["opt_v1"], batch["target"]
        out = self.model(v1, batch["month"], batch["biome"])
        truth, inp, res = (a[0].float().cpu().numpy() for a in (target, v1, out))
        clean = bool(batch.get("clean", [False])[0])
        self._val_tiles.append({"clean": clean, **tile_errors(truth, inp, res)})
        if clean:
            return
        loss, _, _ = self.compute_loss(out, target)
        self.log("val_loss", loss, prog_bar=True, batch_size=1, sync_dist=True)
        scores = {"in": compare(truth, inp), "out": compare(truth, res)}
        for side, metrics in scores.items():
            for name, value in metrics.items():
                if value is not None and math.isfinite(value):
                    self.log(f"val_{name}_{side}", float(value), batch_size=1, sync_dist=True,
                             prog_bar=name == "rmse")

    def on_validation_epoch_start(self) -> None:
        self._val_tiles = []

    def on_validation_epoch_end(self) -> None:
        """Beside the means: pooled RMSE, the median and worst per-tile ratio, tiles worse by > 2 %,
        and how far clean tiles moved (stage2.train.scores), over every rank's tiles."""
        tiles = self._val_tiles
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            parts: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, tiles)
            tiles = [t for part in parts for t in part]
        for name, value in validation_scores(tiles).items():
            self.log(name, float(value), batch_size=1, rank_zero_only=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no weight decay on biases, norms and embeddings), linear warm-up, cosine decay."""
        decay, no_decay = param_groups(self.model)
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


def param_groups(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(with weight decay, without: biases, norms and embeddings), in the optimiser's order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "embed" in name or "token" in name else decay).append(p)
    return decay, no_decay


def with_unknown_month_moments(checkpoint: dict[str, Any], model: torch.nn.Module) -> None:
    """A .ckpt written before the unknown month (12 month rows) resumes: its AdamW moments of the month
    embedding gain a zero row 0, as its weights do on load (Stage2Refiner's load hook)."""
    weight = (checkpoint.get("state_dict") or {}).get("model.month_embed.weight")
    rows = model.month_embed.num_embeddings
    if weight is None or weight.shape[0] != rows - 1:
        return
    decay, no_decay = param_groups(model)
    index = next(i for i, p in enumerate([*decay, *no_decay]) if p is model.month_embed.weight)
    for opt in checkpoint.get("optimizer_states") or []:
        state = opt.get("state", {}).get(index, {})
        for key, moment in state.items():
            if isinstance(moment, torch.Tensor) and moment.shape[:1] == (rows - 1,):
                state[key] = torch.cat((moment.new_zeros(1, *moment.shape[1:]), moment))


def run_best(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """{"path", "score"} of the best val_loss checkpoint of the run that wrote `checkpoint` (its ModelCheckpoint)."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not (str(key).startswith("ModelCheckpoint") and isinstance(state, Mapping)):
            continue
        path, score = state.get("best_model_path"), state.get("best_model_score")
        if state.get("monitor") == "val_loss" and path and score is not None:
            return {"path": str(path), "score": float(score)}
    return None


def recorded_best(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The best over every run of a resume chain, as `checkpoint` records it (older files: their own run's)."""
    value = checkpoint.get(BEST_KEY)
    return dict(value) if isinstance(value, Mapping) else run_best(checkpoint)


def better(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """The one with the lower score (val_loss), either if the other is None."""
    if a is None or b is None:
        return a or b
    return a if a["score"] <= b["score"] else b


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
