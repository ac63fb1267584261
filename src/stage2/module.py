"""The LightningModule for prediction: one padded batch in, one cropped opt_v2 per tile out.

Also owns the CUDA out-of-memory policy (SPEC 5): split the batch in halves down to one tile,
and run a tile that still does not fit on the CPU with the same weights.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from torch import nn

from .data import Batch

log = logging.getLogger("stage2")


@dataclass
class Prediction:
    """predict_step's result, consumed by the writer."""

    batch: Batch
    outputs: list[np.ndarray] = field(default_factory=list)    # float32 (4, H, W) per good tile
    cpu_fallback: list[bool] = field(default_factory=list)
    model_s: float = 0.0                                         # model time of this batch
    device: str = "cpu"


class Stage2Module(L.LightningModule):
    """Wraps Stage2Refiner for `trainer.predict`; the writer callback does all file output."""

    def __init__(self, model: nn.Module, compile: bool = False) -> None:
        super().__init__()
        self.model = model
        self.compile = compile
        self._compiled = None
        self._cpu_model: nn.Module | None = None

    def setup(self, stage: str) -> None:
        if self.compile:
            # torch.compile is lazy: failures (no C++ tool chain, unsupported op) show up at the first call,
            # where _forward catches them and falls back to eager.
            self._compiled = torch.compile(self.model.forward_padded, dynamic=False)

    def _forward(self, x: torch.Tensor, month: torch.Tensor, biome: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled(x, month, biome)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                log.warning("torch.compile failed (%s): running eagerly", first)
                self._compiled = None
        return self.model.forward_padded(x, month, biome)

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        return batch.to(device, non_blocking=device.type == "cuda")

    def _fallback_model(self) -> nn.Module:
        """A float32 CPU copy of the model, made once, for tiles that do not fit on the GPU."""
        if self._cpu_model is None:
            self._cpu_model = copy.deepcopy(self.model).float().cpu().eval()
        return self._cpu_model

    def _run(self, x: torch.Tensor, month: torch.Tensor, biome: torch.Tensor,
             names: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Forward with the OOM policy; returns outputs on x's device and per-tile CPU-fallback flags."""
        try:
            return self._forward(x, month, biome), [False] * len(names)
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(names) > 1:
                half = len(names) // 2
                log.warning("CUDA out of memory at batch %d: retrying in halves", len(names))
                a, fa = self._run(x[:half], month[:half], biome[:half], names[:half])
                b, fb = self._run(x[half:], month[half:], biome[half:], names[half:])
                return torch.cat((a, b)), fa + fb
            log.warning("CPU fallback: %s", names[0])
            with torch.autocast("cuda", enabled=False):
                out = self._fallback_model().forward_padded(x.float().cpu(), month.cpu(), biome.cpu())
            return out.to(x.device, dtype=x.dtype), [True]

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Prediction:
        pred = Prediction(batch=batch, device=str(self.device))
        if batch.x is None:
            return pred
        start = time.perf_counter()
        out, pred.cpu_fallback = self._run(batch.x, batch.month, batch.biome, [t.name for t in batch.tiles])
        out = out.float().cpu().numpy()       # the copy synchronises, so model_s is real time
        pred.model_s = time.perf_counter() - start
        pred.outputs = [out[i, :, :h, :w] for i, (h, w) in enumerate(batch.sizes)]
        return pred
