"""The BasePredictionWriter: every file a run writes goes through here.

On a GPU, outputs are written by a small thread pool with a bounded queue, so the next forward
pass does not wait for the disk; on a few-core CPU (`writer_threads=0`, the `cpu` profile) they are
written between batches, because a writer thread there only takes a core from torch's threads.
Either way each tile is written atomically (NPZ, then JSON) and exactly once. Failures from the
DataModule arrive on the same road and are logged as JSON lines.

A write that fails because of the output folder itself (disk full, read-only, gone: see
stage2.runtime.FOLDER_ERRNOS) is raised at once, so the run stops (exit 3) instead of computing
tiles it cannot write; any other write error fails that tile alone.

Windows of a large tile are blended into its accumulator in the main thread as they arrive (in
order, so the sum is the same in every run); the tile is written once, when its last window is in.
A run killed before that leaves nothing of the tile on disk.

With `tta` other than none each tile has a second layer, its std across the passes (`opt_v2_std`),
and every tile's JSON has `processing.tta` and `confidence` (docs/confidence.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ..conditioning import counts as conditioning_counts
from ..formats.cog import CogSettings
from ..product import OUTPUT_FORMATS, OUTPUT_KEY, STD_KEY, output_metadata, write_output
from ..runtime import RunError, folder_problem, uses_amp
from ..store import Store
from ..tiles import BANDS, Tile, TileError
from .confidence import TTA_MODES, ChangeSum, confidence
from .module import Prediction
from .pixelstats import TileStats
from .summary import FIRST_FAILURES, TileRecord
from .windows import Assembler, whole_tile

log = logging.getLogger("stage2")


@dataclass
class Output:
    """One tile's finished opt_v2 (a whole tile, or a windowed tile's last window just blended in)."""

    tile: Tile
    opt_v2: np.ndarray
    cpu_fallback: bool
    model_s: float              # this tile's share of model time
    windows: dict[str, Any]     # `processing.windows`
    assembled: bool = False     # a windowed tile: no-data NaN already in, quality and change measured strip by strip
    quality: dict[str, float | None] | None = None
    std: np.ndarray | None = None       # opt_v2_std (tta != none)
    change: ChangeSum | None = None     # an assembled tile's |opt_v2 - opt_v1|
    stats: TileStats | None = None      # a whole tile's statistics, measured on the device


class TileWriter(BasePredictionWriter):
    """Writes opt_v2 (NPZ, COG or both) + JSON per tile and `_stage2_failures.jsonl`; gathers the run's counts."""

    def __init__(self, *, store: Store, processing: dict[str, Any], quality: bool, threads: int,
                 output_format: str, cog: Mapping[str, Any], tta: str) -> None:
        super().__init__(write_interval="batch")
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format={output_format!r}: use one of {list(OUTPUT_FORMATS)}")
        if tta not in TTA_MODES:
            raise ValueError(f"tta={tta!r}: use one of {list(TTA_MODES)}")
        self.output_format = output_format
        self.cog = CogSettings(**cog)
        self.store = store
        self._world = 1
        self.processing = processing        # run-wide `processing` fields of the output JSON
        self.processing["tta"] = tta        # in place: the run's summary reads the same record
        self.quality = quality
        self.threads = max(0, int(threads))   # 0: write in the main thread, between batches
        self.records: list[TileRecord] = []
        self.failures: list[dict[str, str]] = []
        self.batch_marks: list[tuple[float, int]] = []    # (time, tiles) at each batch end
        self.model_s = 0.0
        self.assembler = Assembler(quality)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._slots: threading.BoundedSemaphore | None = None
        self._futures: list[Future] = []

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The precision Lightning actually runs (16-mixed becomes bf16-mixed on a CPU), not the one asked for.
        self.processing.update(precision=str(trainer.precision), use_amp=uses_amp(str(trainer.precision)))
        # Here, not in on_predict_start: every rank calls setup, but a rank that got no batch
        # (fewer batches than devices) skips the predict loop and its hooks, so a barrier there
        # would wait forever. Rank 0 cleans up before any rank can write.
        self._world = trainer.world_size
        if trainer.is_global_zero:
            self.store.clean_temporaries()
            self.store.reset_failures()
        trainer.strategy.barrier("stage2-writer-setup")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.threads:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="stage2-writer")
            self._slots = threading.BoundedSemaphore(2 * self.threads)
        self.batch_marks = [(time.perf_counter(), 0)]

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Prediction,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.batch_marks.append((time.perf_counter(), prediction.batch.progress))
        self.model_s += prediction.model_s
        for failure in prediction.batch.failures:
            self._record_failure(failure.path, failure.reason, failure.hint)
        self._raise_write_errors()
        outputs = self._finished(prediction)
        if not outputs:
            return
        if self.threads == 0:
            # inline: on few cores a writer thread only steals from torch
            self._write_outputs(outputs, prediction.device)
        else:
            self._slots.acquire()       # bounded: at most 2 x threads batches wait in memory
            fut = self._pool.submit(self._write_outputs, outputs, prediction.device)
            fut.add_done_callback(lambda _: self._slots.release())
            self._futures.append(fut)
            self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close()

    def _raise_write_errors(self) -> None:
        """A writer thread's error (the folder is full or gone) stops the run at the next batch, not at the end."""
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def close(self) -> None:
        """Wait for pending writes; re-raise an unexpected writer error."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for f in self._futures:
            f.result()
        self._futures = []

    # ------------------------------------------------------------------ work
    def _record_failure(self, path: Any, reason: str, hint: str) -> None:
        entry = {"file": str(path), "reason": reason, "hint": hint}
        with self._lock:
            self.failures.append(entry)
            self.store.add_failure(entry, self.failures, self._world)
        log.warning("failed: %s: %s (%s)", path, reason, hint)

    def _finished(self, pred: Prediction) -> list[Output]:
        """The batch's whole tiles, and the windowed tiles whose last window this batch brought."""
        n, share = len(pred.batch.tiles), pred.model_s / max(len(pred.outputs), 1)
        stds = pred.stds or [None] * len(pred.outputs)
        stats = pred.stats or [None] * n
        done = [Output(t, y, fb, share, whole_tile(y.shape), std=sd, stats=st)
                for t, y, fb, sd, st in zip(pred.batch.tiles, pred.outputs[:n], pred.cpu_fallback[:n], stds[:n],
                                            stats, strict=True)]
        for asm in self.assembler.add(pred.batch.windows, pred.outputs[n:], share, pred.cpu_fallback[n:],
                                      pred.stds[n:]):
            opt_v2, q = asm.result()
            done.append(Output(asm.tile, opt_v2, asm.cpu_fallback, asm.model_s, asm.grid.describe(), True, q,
                               asm.std, asm.change))
        return done

    def _write_outputs(self, outputs: list[Output], device: str) -> None:
        stamp = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
        for o in outputs:
            tile = o.tile
            try:
                q = o.quality if o.assembled else self._quality(tile, o)
                conf = self._confidence(tile, o)
                if tile.nodata is not None and not o.assembled:
                    o.opt_v2[:, tile.nodata] = np.nan      # no data in, no data out (SPEC 9)
                    if o.std is not None:
                        o.std[:, tile.nodata] = np.nan
                processing = {
                    **self.processing,
                    "input_file": str(tile.path),
                    **tile.source,
                    "device": "cpu" if o.cpu_fallback else device,
                    "processing_time_ms": round(1000.0 * o.model_s, 3),
                    "cpu_fallback": bool(o.cpu_fallback),
                    "clipped_values": tile.clipped,
                    "masked_pixels": tile.masked,
                    "windows": o.windows,
                    # what the model was given for month and biome, and whether it knew them (SPEC 6)
                    **({"conditioning": tile.conditioning} if getattr(tile, "conditioning", None) else {}),
                }
                meta = output_metadata(_with_georef(tile), processing=processing, defaults=tile.defaults,
                                       quality=q, timestamp=stamp, confidence=conf)
                layers = {OUTPUT_KEY: o.opt_v2} if o.std is None else {OUTPUT_KEY: o.opt_v2, STD_KEY: o.std}
                georeferenced = write_output(self.store, tile.name, layers, meta, geo=tile.geo,
                                             output_format=self.output_format, cog_settings=self.cog,
                                             stats=None if o.stats is None else o.stats.band_stats)
            except TileError as e:       # the COG cannot carry this tile's georeferencing
                self._record_failure(tile.path, e.reason, e.hint)
                continue
            except Exception as e:
                if folder_problem(e) or isinstance(e, RunError):
                    raise           # the folder (or the bucket), not this tile: the run stops (exit 3)
                self._record_failure(tile.path, f"could not write the output: {type(e).__name__}: {e}",
                                     "rename the tile or its sub-folder if the name is the problem, "
                                     "else report it to the stage2 maintainers")
                continue
            unseen, missing = conditioning_counts(getattr(tile, "conditioning", None))
            rec = TileRecord(tile.name, bool(tile.defaults), tile.clipped > 0, bool(o.cpu_fallback),
                             q["ndvi_rmse"] if q else None, q["edge_preservation"] if q else None, georeferenced,
                             *_confidence_record(conf), unseen_conditions=unseen, missing_conditions=missing)
            with self._lock:
                self.records.append(rec)

    @staticmethod
    def _confidence(tile: Tile, o: Output) -> dict[str, Any]:
        """The tile's `confidence` over its valid pixels (before no-data NaN goes into a whole tile's layers)."""
        if o.stats is not None:
            return {**(o.stats.std_stats or {}), "mean_abs_change": o.stats.mean_abs_change}
        valid = None if tile.nodata is None else ~tile.nodata
        change = o.change
        if change is None:
            change = ChangeSum()
            change.add(tile.array, o.opt_v2, valid)
        return confidence(change, o.std, valid)

    def _quality(self, tile: Tile, o: Output) -> dict[str, float | None] | None:
        """Quality of the valid pixels (masked ones are filled values, not data)."""
        if not self.quality:
            return None
        if o.stats is not None and o.stats.quality is not None:
            return o.stats.quality
        from ..quality import tile_quality

        return tile_quality(tile.array, o.opt_v2, valid=None if tile.nodata is None else ~tile.nodata)

    # ------------------------------------------------------------------ figures
    def steady_tiles_per_s(self) -> float:
        """Tiles/s after the first batch (which pays warm-up), or tiles/model-time for one batch."""
        marks = self.batch_marks
        total = sum(n for _, n in marks)
        if len(marks) >= 3 and marks[-1][0] > marks[1][0]:
            return sum(n for _, n in marks[2:]) / (marks[-1][0] - marks[1][0])
        return total / self.model_s if self.model_s > 0 else 0.0

    def gathered(self, trainer: L.Trainer) -> tuple[list[TileRecord], list[dict[str, str]], float]:
        """Records, failures and tiles/s over all ranks (identity on one process)."""
        local = (self.records, self.failures, self.steady_tiles_per_s())
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return local
        parts: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(parts, local)
        records = [r for p in parts for r in p[0]]
        failures = [f for p in parts for f in p[1]]
        return records, failures, sum(p[2] for p in parts)


def _with_georef(tile: Tile) -> dict[str, Any]:
    """The tile's metadata with its georeferencing as `crs` and `transform` (a GeoTIFF input's; a sidecar's
    own keys win), so an NPZ output can be placed on a map and a rerun to COG keeps its location."""
    if tile.geo is None or "crs" in tile.meta:
        return tile.meta
    return {**tile.meta, "crs": tile.geo.crs, "transform": list(tile.geo.transform)}


def _confidence_record(conf: dict[str, Any]) -> tuple[Any, Any, Any]:
    """A TileRecord's std means and 95th percentiles (per band, None without a std) and mean change."""
    if BANDS[0] not in conf:
        return None, None, conf["mean_abs_change"]
    return (tuple(conf[b]["std_mean"] for b in BANDS), tuple(conf[b]["std_p95"] for b in BANDS),
            conf["mean_abs_change"])


def first_failures(failures: list[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(failures, key=lambda f: f["file"])[:FIRST_FAILURES]

