"""The LightningModule for prediction: one padded batch in, one cropped opt_v2 per tile (or window) out.

Also owns the CUDA out-of-memory policy (SPEC 5): split the batch in halves down to one tile,
and run a tile that still does not fit on the CPU with the same weights; on the CPU, runs a
batch as `cpu_streams` concurrent forwards (see `Stage2Module._forward_streams`); and with
`tta` other than none, runs each tile's test-time augmentation passes as one forward and gives
their mean and per-pixel std (see `Stage2Module._run_tta` and docs/confidence.md).
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from torch import nn

from ..model import pad_to_multiple
from .confidence import TTA_PASSES
from .data import Batch
from .pixelstats import TileStats, batch_stats, on_device

log = logging.getLogger("stage2")


@dataclass
class Prediction:
    """predict_step's result, consumed by the writer."""

    batch: Batch
    outputs: list[np.ndarray] = field(default_factory=list)    # float32 (4, H, W) per good tile, then per window
    stds: list[np.ndarray] = field(default_factory=list)       # ... their std across TTA passes (tta != none)
    cpu_fallback: list[bool] = field(default_factory=list)
    stats: list[TileStats] = field(default_factory=list)      # per whole tile, where measured on the device
    model_s: float = 0.0                                         # model time of this batch
    device: str = "cpu"


# Concurrent forwards pay off only for chunks of at least two tiles and this many patch tokens
# (a 120 px tile pads to 128 px: 64 tokens). Measured on 2 cores (benchmarks/bench_batch.py,
# best of 3): one-tile chunks 0.80-1.01x, chunks of 2-4 tiles of 16 tokens 0.93-1.03x; chunks of
# >= 2 tiles and >= 128 tokens 1.00-1.24x (v1_100 and tiny, 128 and 256 px).
# Under CPU bf16 autocast a token costs half the time, so the hand-off weighs twice as much:
# v1_100, bf16, best of 3 (`bench_batch.py --precision bf16`): chunks of 2 tiles x 64 tokens
# 0.87-0.94x (128 px, batch 4-8); chunks of >= 256 tokens 1.01-1.11x (256 px, batch 2-8).
STREAM_MIN_TILES = 2
STREAM_MIN_TOKENS = 128
STREAM_MIN_TOKENS_BF16 = 256


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Cast the weights of Linear and convolution layers to `dtype` in place; return the originals.

    Why: CPU autocast casts every fp32 weight to bf16 at every forward (Lightning enters autocast
    per batch, and autocast's weight cache did not help under inference mode even across batches:
    29-31 vs 34 tiles/s under no_grad), 16 % of a bf16 forward's time in the profiler. Casting once
    gives bit-identical outputs, as autocast's cast is the same rounding: prithvi_eo_v1_100, 128 px,
    batch 4, per-batch autocast: 28-31 -> 34-35 tiles/s, max difference 0.0. Only the layers autocast runs in bf16 are
    cast; norms, embeddings and buffers stay fp32, as autocast runs them.
    """
    kept = []
    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            for param in layer.parameters(recurse=False):
                if param.dtype == torch.float32:
                    kept.append((param, param.data))
                    param.data = param.data.to(dtype)
    return kept


class Pass(NamedTuple):
    """One element of the dihedral group D4 on the last two axes: transpose (when `transpose`), then flip `dims`.

    The 8 combinations are the group: the flips alone are the identity, the horizontal, vertical
    and double flip (a 180-degree rotation); a transpose followed by one flip is a 90-degree rotation,
    by none or both a diagonal mirror.
    """

    transpose: bool
    dims: tuple[int, ...]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(-2, -1) if self.transpose else x
        return torch.flip(x, self.dims) if self.dims else x

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        y = torch.flip(y, self.dims) if self.dims else y
        return y.transpose(-2, -1) if self.transpose else y

    def size(self, h: int, w: int) -> tuple[int, int]:
        """The (H, W) of an (h, w) tile after this pass."""
        return (w, h) if self.transpose else (h, w)


FLIPS = ((), (-1,), (-2,), (-2, -1))


def tta_passes(tta: str) -> tuple[Pass, ...]:
    """The passes of a `tta` mode, the identity first; none for `none` (the plain forward runs)."""
    if tta not in TTA_PASSES:
        raise ValueError(f"tta={tta!r}: use one of {list(TTA_PASSES)}")
    if tta == "none":
        return ()
    transposes = (False, True) if tta == "d4" else (False,)
    return tuple(Pass(t, dims) for t in transposes for dims in FLIPS)


class Moments:
    """Mean and population std of the passes, added one by one without keeping them (float32).

    Sums of the differences from the first pass, sum(d) and sum(d * d): one read of each pass and
    two accumulators, no tensor of all passes. Stacking the passes and calling torch.std_mean took
    270 ms for 8 passes of 4 tiles of 256 px, this 26 ms (best of 8, 2 cores), 1e-7 apart. The shift
    keeps the sums at the scale of the spread, so var = sum(d * d) / n - (sum(d) / n)^2 loses nothing
    to cancellation, as it would with raw sums of values near 0.5 where the std may be near 0.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None

    def add(self, y: torch.Tensor) -> None:
        """One pass's outputs (float32, any strides; `y` may be overwritten after the call)."""
        self.n += 1
        if self.shift is None:
            self.shift = y.float().clone(memory_format=torch.contiguous_format)
            self.sum, self.sq = torch.zeros_like(self.shift), torch.zeros_like(self.shift)
            return
        d = y.float() - self.shift
        self.sum += d
        self.sq.addcmul_(d, d)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the passes added."""
        m = self.sum.div_(self.n)
        var = self.sq.div_(self.n).sub_(m * m).clamp_(min=0.0)
        return self.shift.add_(m), var.sqrt_()


class Stage2Module(L.LightningModule):
    """Wraps Stage2Refiner for `trainer.predict`; the writer callback does all file output."""

    def __init__(self, model: nn.Module, *, compile: bool, cpu_streams: int, tta: str, quality: bool,
                 pixel_stats: str) -> None:
        """`quality` and `pixel_stats` (auto | device | host): whether and where the per-pixel statistics
        of whole tiles are computed (stage2.predict.pixelstats); the writer computes what is not."""
        super().__init__()
        self.model = model
        self.quality = bool(quality)
        on_device(pixel_stats, torch.device("cpu"))          # checks the setting now, not at the first batch
        self.pixel_stats = pixel_stats
        self.compile = compile
        self.cpu_streams = max(1, int(cpu_streams))
        self.passes = tta_passes(tta)
        self._compiled = None
        self._cpu_model: nn.Module | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._fp32_weights: list[tuple[nn.Parameter, torch.Tensor]] = []

    def setup(self, stage: str) -> None:
        if self.compile:
            # torch.compile is lazy: failures (no C++ tool chain, unsupported op) show up at the first call,
            # where _forward catches them and falls back to eager.
            self._compiled = torch.compile(self.model.forward_padded, dynamic=False)

    def on_predict_start(self) -> None:
        if self.device.type == "cpu":
            from ..runtime import keep_freed_memory

            keep_freed_memory()
            if str(self.trainer.precision) == "bf16-mixed":
                self._fp32_weights = cast_matmul_weights(self.model, torch.bfloat16)

    def on_predict_end(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.teardown("predict")

    def teardown(self, stage: str) -> None:
        """Give the model back its fp32 weights (also after a failed run: the caller may reuse it)."""
        for param, fp32 in self._fp32_weights:
            param.data = fp32
        self._fp32_weights = []

    def _n_streams(self, x: torch.Tensor) -> int:
        """How many concurrent forwards this batch gets (1: one forward with all threads).

        1 off the CPU and with compile; otherwise at most `cpu_streams` and one per thread, and
        only as many as give each chunk STREAM_MIN_TILES tiles and STREAM_MIN_TOKENS patch tokens
        (STREAM_MIN_TOKENS_BF16 under bf16 autocast or with bf16 weights).
        """
        if self.device.type != "cpu" or self._compiled is not None or self.cpu_streams == 1:
            return 1
        p = int(self.model.patch_size)
        tokens = x.shape[0] * (x.shape[-2] // p) * (x.shape[-1] // p)
        reduced = torch.is_autocast_enabled("cpu") or x.dtype in (torch.bfloat16, torch.float16)
        min_tokens = STREAM_MIN_TOKENS_BF16 if reduced else STREAM_MIN_TOKENS
        return max(1, min(self.cpu_streams, torch.get_num_threads(), x.shape[0] // STREAM_MIN_TILES,
                          tokens // min_tokens))

    def _forward_streams(self, x: torch.Tensor, month: torch.Tensor, biome: torch.Tensor) -> torch.Tensor:
        """CPU: the batch as `cpu_streams` chunks run at once, each with its share of torch's threads.

        Why: on a CPU, one forward over a batch does not keep every core busy (each op ends in a
        barrier, and element-wise ops and small GEMMs scale poorly across threads). Two forwards
        side by side, each with half the threads, were 1.04-1.24x faster than one forward with all
        threads on 2 cores for chunks of >= 2 tiles and >= 128 patch tokens (batch 4 of 120 or
        256 px tiles); smaller batches run as one forward (benchmarks/README.md). Each tile's values are
        the same either way (the model is batch-independent). torch's thread count is per thread,
        so the main thread keeps all threads for one-forward batches and everything else.
        """
        n = self._n_streams(x)
        if n == 1:
            return self._forward(x, month, biome)
        threads = max(1, torch.get_num_threads() // n)
        autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

        def run(chunk: tuple[torch.Tensor, ...]) -> torch.Tensor:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)      # this worker thread only
            # grad and autocast modes are thread-local: restate the caller's
            with torch.inference_mode(), torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
                return self._forward(*chunk)

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.cpu_streams, thread_name_prefix="stage2-stream")
        chunks = zip(x.tensor_split(n), month.tensor_split(n), biome.tensor_split(n), strict=True)
        futures = [self._pool.submit(run, c) for c in chunks]
        return torch.cat([f.result() for f in futures])

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
            return self._forward_streams(x, month, biome), [False] * len(names)
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

    def _run_tta(self, x: torch.Tensor, month: torch.Tensor, biome: torch.Tensor, sizes: list[tuple[int, int]],
                 names: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Every pass of every tile, mapped back: their mean and population std (float32, x's device and
        padded shape; each tile's own H x W at the top left), and per-tile CPU-fallback flags.

        Each pass transforms the tile itself, not its padded rows, and pads the result again: a tile
        runs as it would alone (rotated 90 degrees, a non-square tile swaps H and W). Passes that
        pad to the same shape (all of them for square tiles) are one batch: one forward of passes x
        tiles rows, under the same OOM policy and `cpu_streams` as any batch; month and biome repeat.
        """
        b, (hp, wp) = x.shape[0], x.shape[-2:]
        whole = all(s == (hp, wp) for s in sizes)         # no tile is padded: transform the batch at once
        inputs = [self._pass_input(x, sizes, g, whole) for g in self.passes]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k, xk in enumerate(inputs):
            by_shape.setdefault(tuple(xk.shape[-2:]), []).append(k)
        moments = Moments()
        fallback = [False] * b
        scratch = None if whole else torch.zeros((b, x.shape[1], hp, wp), dtype=torch.float32, device=x.device)
        for ks in by_shape.values():
            rows = torch.cat([inputs[k] for k in ks])
            for k in ks:
                inputs[k] = None       # the concatenation holds them now
            n = len(ks)
            label = [f"{name} (pass {k + 1}/{len(self.passes)})" for k in ks for name in names]
            y, fb = self._run(rows, month.repeat(n), biome.repeat(n), label)
            del rows
            for j, k in enumerate(ks):
                moments.add(self._pass_output(scratch, y[j * b:(j + 1) * b], sizes, self.passes[k]))
                fallback = [a or c for a, c in zip(fallback, fb[j * b:(j + 1) * b], strict=True)]
            del y
        mean, std = moments.result()
        return mean, std, fallback

    def _pass_input(self, x: torch.Tensor, sizes: list[tuple[int, int]], g: Pass, whole: bool) -> torch.Tensor:
        """The batch under pass `g`: each tile cropped to its size, transformed and reflect-padded again."""
        if whole:
            return g.apply(x)
        p = int(self.model.patch_size)
        return torch.cat([pad_to_multiple(g.apply(x[i:i + 1, :, :h, :w]), p) for i, (h, w) in enumerate(sizes)])

    @staticmethod
    def _pass_output(scratch: torch.Tensor | None, y: torch.Tensor, sizes: list[tuple[int, int]],
                     g: Pass) -> torch.Tensor:
        """Pass `g`'s outputs `y` mapped back: the whole batch at once, or each tile's H x W into the top
        left of `scratch` (B, 4, Hp, Wp), which the next pass reuses."""
        if scratch is None:
            return g.invert(y)
        for i, (h, w) in enumerate(sizes):
            gh, gw = g.size(h, w)
            scratch[i, :, :h, :w] = g.invert(y[i, :, :gh, :gw])
        return scratch

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Prediction:
        pred = Prediction(batch=batch, device=str(self.device))
        if batch.x is None:
            return pred
        start = time.perf_counter()
        std = None
        if self.passes:
            out, std, pred.cpu_fallback = self._run_tta(batch.x, batch.month, batch.biome, batch.sizes, batch.names)
        else:
            out, pred.cpu_fallback = self._run(batch.x, batch.month, batch.biome, batch.names)
            out = out.float()
        n = len(batch.tiles)
        if n and on_device(self.pixel_stats, out.device):
            pred.stats = batch_stats(batch.tiles, batch.x[:n], out[:n], None if std is None else std[:n],
                                     quality=self.quality)
        out = out.cpu().numpy()       # the copy synchronises, so model_s is real time
        if std is not None:
            spread = std.cpu().numpy()
            pred.stds = [spread[i, :, :h, :w] for i, (h, w) in enumerate(batch.sizes)]
        pred.model_s = time.perf_counter() - start
        pred.outputs = [out[i, :, :h, :w] for i, (h, w) in enumerate(batch.sizes)]
        return pred
