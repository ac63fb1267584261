"""The LightningDataModule: tiles of varying size in, padded same-size batches out.

A ViT attends over every token of its input, so padding a 120 px tile to 256 px to share a batch
would change its output. The batch sampler therefore groups tiles by their *padded* size (the
next multiple of the patch size); within a batch each tile is reflect-padded to that size with
the model's own `pad_to_multiple` and cropped back after the forward pass. A tile's result is
thus independent of its neighbours, of the batch size and of the worker count.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..model import pad_to_multiple, padded_size
from ..tiles import MIN_SIDE, N_BANDS, Tile, TileFailure, load_tile, peek_shape, tile_name
from .memory import TILE_HINT, MemoryBudget


@dataclass
class Batch:
    """What predict_step receives: the good tiles as one padded tensor, plus the failures."""

    tiles: list[Tile]
    failures: list[TileFailure]
    x: torch.Tensor | None = None         # (B, 4, Hp, Wp) float32, reflect-padded
    month: torch.Tensor | None = None     # (B,) long, 1-12
    biome: torch.Tensor | None = None     # (B,) long, 0-15
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tiles) + len(self.failures)

    def pin_memory(self) -> Batch:
        if self.x is not None:
            self.x = self.x.pin_memory()
        return self

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        if self.x is not None:
            self.x = self.x.to(device, non_blocking=non_blocking)
            self.month = self.month.to(device, non_blocking=non_blocking)
            self.biome = self.biome.to(device, non_blocking=non_blocking)
        return self


class TileDataset(Dataset):
    """Reads and validates one tile per index; a bad tile becomes a TileFailure, never an exception.

    A tile too large for the memory budget fails from its header alone, before it is read.
    """

    def __init__(self, files: Sequence[Path], input_dir: Path, budget: MemoryBudget, multiple: int) -> None:
        self.files = list(files)
        self.input_dir = Path(input_dir)
        self.budget = budget
        self.multiple = multiple

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tile | TileFailure:
        path = self.files[index]
        reason = self.budget.too_large(peek_shape(path), self.multiple)
        if reason is not None:
            return TileFailure(tile_name(path, self.input_dir), path, reason, TILE_HINT)
        return load_tile(path, self.input_dir)


def bucket_key(shape: tuple[int, ...] | None, multiple: int) -> Hashable:
    """Padded (H, W) for a valid-looking header; one shared key for anything the reader will reject."""
    if shape is None or len(shape) != 3 or shape[0] != N_BANDS or min(shape[1:]) < MIN_SIDE:
        return "invalid"
    return padded_size(shape[1], shape[2], multiple)


class SizeBucketBatchSampler(Sampler[list[int]]):
    """Batches of indices that share a bucket key, split across ranks with no padding duplicates.

    Lightning's DistributedSampler pads the index list so every rank gets the same count, which
    would process some tiles twice. Here whole batches are dealt round-robin to the ranks: every
    tile is in exactly one batch on exactly one rank (ranks may get one batch more or less).
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        groups: dict[Hashable, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        batches = [idx[i:i + batch_size] for idx in groups.values() for i in range(0, len(idx), batch_size)]
        self.batches = batches[rank::world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def collate(items: list[Tile | TileFailure], multiple: int) -> Batch:
    """Stack the good tiles of one bucket, each reflect-padded to the bucket's size."""
    tiles = [t for t in items if isinstance(t, Tile)]
    failures = [t for t in items if isinstance(t, TileFailure)]
    batch = Batch(tiles=tiles, failures=failures)
    if tiles:
        padded = [pad_to_multiple(torch.from_numpy(t.array).unsqueeze(0), multiple) for t in tiles]
        if len({p.shape for p in padded}) != 1:  # the sampler guarantees one size; guard anyway
            raise RuntimeError(f"mixed padded sizes in one batch: {[p.shape for p in padded]}")
        batch.x = torch.cat(padded)
        batch.month = torch.tensor([t.month for t in tiles], dtype=torch.long)
        batch.biome = torch.tensor([t.biome for t in tiles], dtype=torch.long)
        batch.sizes = [tuple(t.array.shape[1:]) for t in tiles]
    return batch


class _Collate:
    """Picklable collate_fn (DataLoader workers may be spawned)."""

    def __init__(self, multiple: int) -> None:
        self.multiple = multiple

    def __call__(self, items: list[Tile | TileFailure]) -> Batch:
        return collate(items, self.multiple)


class TileDataModule(L.LightningDataModule):
    """Owns the tile list, the size-bucketing sampler and the DataLoader for `trainer.predict`."""

    def __init__(self, *, files: Sequence[Path], input_dir: str | Path, batch_size: int, num_workers: int,
                 pin_memory: bool, patch_size: int, budget: MemoryBudget) -> None:
        super().__init__()
        self.budget = budget
        self.files = list(files)
        self.input_dir = Path(input_dir)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.patch_size = int(patch_size)
        self._keys: list[Hashable] | None = None
        # With fewer batches than devices some ranks get none; that is fine (see TileWriter.setup).
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def bucket_keys(self) -> list[Hashable]:
        """Padded sizes from the NPZ headers (no pixel data is read)."""
        if self._keys is None:
            self._keys = [bucket_key(peek_shape(f), self.patch_size) for f in self.files]
        return self._keys

    def predict_dataloader(self) -> DataLoader:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        sampler = SizeBucketBatchSampler(self.bucket_keys(), self.batch_size, rank, world)
        workers = min(self.num_workers, max(len(sampler), 0))
        return DataLoader(
            TileDataset(self.files, self.input_dir, self.budget, self.patch_size),
            batch_sampler=sampler,
            collate_fn=_Collate(self.patch_size),
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False,
        )

    def tiles_on_rank(self, rank: int, world: int) -> int:
        sampler = SizeBucketBatchSampler(self.bucket_keys(), self.batch_size, rank, world)
        return sum(len(b) for b in sampler.batches)
