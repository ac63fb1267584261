"""Lightning's TQDM progress bar, counting tiles instead of batches (tiles done, tiles/s, ETA).

A windowed tile advances the bar by 1/n per window of its n, so the bar moves through a large tile.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class TileProgressBar(TQDMProgressBar):
    """Counts tiles on this rank; `total` is the number of tiles this rank will see."""

    def __init__(self, total_tiles: Callable[[L.Trainer], float], refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._total_tiles = total_tiles
        self._done = 0

    def init_predict_tqdm(self) -> Tqdm:
        return Tqdm(desc="stage2", unit="tile", position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0.3)

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        self._done = 0
        self.predict_progress_bar.reset(total=round(self._total_tiles(trainer)))
        self.predict_progress_bar.set_description("stage2")

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                             batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._done += batch.progress
        bar = self.predict_progress_bar
        if bar is not None and not bar.disable:
            done = round(self._done, 2)         # whole tiles as integers, windows as fractions of a tile
            bar.n = int(done) if done == int(done) else done
            bar.refresh()
