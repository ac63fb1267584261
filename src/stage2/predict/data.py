"""The LightningDataModule: tiles of varying size in, padded same-size batches out.

A ViT attends over every token of its input, so padding a 120 px tile to 256 px to share a batch
would change its output. The batch sampler therefore groups tiles by their *padded* size (the
next multiple of the patch size); within a batch each tile is reflect-padded to that size as
the model's own `pad_to_multiple` pads it, and cropped back after the forward pass. A tile's result is
thus independent of its neighbours, of the batch size and of the worker count.

A tile above `window.above` enters the sampler as its windows (stage2.predict.windows): items of
the window's size, bucketed with same-size tiles. Workers carry only references to windows; the
main process cuts their pixels in `on_before_batch_transfer`, from the tile it read once.

Conditions (SPEC 6): where a tile is read, its month and biome become what the model is given
(stage2.conditioning: the learned "unknown" where the metadata is missing or, with
`unseen_conditioning: unknown`, where the checkpoint never trained on the value); the tile keeps
its own values in `meta` and carries the record for `processing.conditioning`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..conditioning import Conditioner
from ..formats import file_name, load_remote_tile, load_tile, peek_shape
from ..model import padded_size
from ..store import is_url, relative_key
from ..tiles import MIN_SIDE, N_BANDS, Tile, TileFailure
from .windows import Grid, Window, WindowRef, WindowSettings, WindowSource, grid_for


@dataclass
class Batch:
    """What predict_step receives: the good tiles as one padded tensor, plus the failures."""

    tiles: list[Tile]
    failures: list[TileFailure]
    x: torch.Tensor | None = None         # (B, 4, Hp, Wp) float32, reflect-padded: the tiles, then the windows
    month: torch.Tensor | None = None     # (B,) long, 1-12 (0: unknown)
    biome: torch.Tensor | None = None     # (B,) long, 0-15 (0: unknown)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    refs: list[WindowRef] = field(default_factory=list)     # windows to cut (main process)
    windows: list[Window] = field(default_factory=list)     # ... and once cut
    progress: float = 0.0                 # tiles this batch completes: 1 per tile, 1/n per window of n

    def __len__(self) -> int:
        return len(self.tiles) + len(self.failures)

    @property
    def names(self) -> list[str]:
        """One name per row of x (for log lines)."""
        return [t.name for t in self.tiles] + [w.name for w in self.windows]

    def add_windows(self, windows: list[Window], multiple: int) -> None:
        """Append the windows' pixels (reflect-padded like tiles) after the tiles' rows."""
        self.windows = windows
        if not windows:
            return
        x = torch.from_numpy(stack_padded([w.array for w in windows], multiple))
        month, biome = _ints([w.tile.month for w in windows]), _ints([w.tile.biome for w in windows])
        parts = [(self.x, x), (self.month, month), (self.biome, biome)]
        self.x, self.month, self.biome = (b if a is None else torch.cat((a, b)) for a, b in parts)
        self.sizes += [tuple(w.array.shape[1:]) for w in windows]

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


def _ints(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


@dataclass
class ConditionedTile(Tile):
    """A tile whose `month` and `biome` are what the model is given (its own values stay in `meta`),
    with `processing.conditioning` (stage2.conditioning) for its output JSON."""

    conditioning: dict[str, Any] | None = None


class Conditioned:
    """Picklable reader wrapper: a read tile becomes a ConditionedTile (failures pass through)."""

    def __init__(self, load: Callable[[Path], Tile | TileFailure], conditioner: Conditioner) -> None:
        self.load = load
        self.conditioner = conditioner

    def __call__(self, path: Path) -> Tile | TileFailure:
        tile = self.load(path)
        if not isinstance(tile, Tile):
            return tile
        month, biome, record = self.conditioner.resolve(tile.month, tile.biome, tile.defaults)
        values = {f.name: getattr(tile, f.name) for f in fields(Tile)}
        return ConditionedTile(**{**values, "month": month, "biome": biome}, conditioning=record)


class Item(NamedTuple):
    """One sampler item: a whole tile (window None) or window `window` of the tile's `of` windows."""

    file: int
    window: int | None = None
    of: int = 1


class TileDataset(Dataset):
    """Reads and validates one tile per item (a bad tile becomes a TileFailure, never an exception);
    a window item gives its WindowRef, cut later in the main process."""

    def __init__(self, files: Sequence[Path], items: Sequence[Item],
                 load: Callable[[Path], Tile | TileFailure]) -> None:
        self.files = list(files)
        self.items = list(items)
        self.load = load          # a partial of formats.load_tile: picklable for spawned workers

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tile | TileFailure | WindowRef:
        item = self.items[index]
        if item.window is not None:
            return WindowRef(item.file, item.window, item.of)
        return self.load(self.files[item.file])


def bucket_key(shape: tuple[int, ...] | None, multiple: int) -> Hashable:
    """Padded (H, W) for a valid-looking header; one shared key for anything the reader will reject."""
    if shape is None or len(shape) != 3 or shape[0] != N_BANDS or min(shape[1:]) < MIN_SIDE:
        return "invalid"
    return padded_size(shape[1], shape[2], multiple)


PEEK_THREADS = 32      # concurrent header reads of a bucket's tiles (s3fs serves them from one event loop)

# A windowed tile's batches go to one rank, and a batch holding windows of two tiles ties both to
# that rank. So that such ties cannot chain a whole bucket of windowed tiles onto one rank, a batch
# is closed early where a new windowed tile begins once this many batches are tied together:
# at most one part-filled batch per 32 (3 % of a GPU's batches), and ranks get units to balance.
UNIT_BATCHES = 32


class SizeBucketBatchSampler(Sampler[list[int]]):
    """Batches of indices that share a bucket key, split across ranks with no padding duplicates.

    Lightning's DistributedSampler pads the index list so every rank gets the same count, which
    would process some tiles twice. Here batches are dealt to the ranks whole: every item is in
    exactly one batch on exactly one rank. Batches holding windows of the same tile (same `groups`
    value) go to one rank together, so a windowed tile is read and assembled in one process. The
    batches are the same whatever the number of ranks, so outputs are identical to one process's.
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int, rank: int = 0, world_size: int = 1,
                 groups: Sequence[Hashable | None] | None = None, unit_batches: int = UNIT_BATCHES) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        groups = [None] * len(keys) if groups is None else groups
        buckets: dict[Hashable, list[int]] = {}
        for i, k in enumerate(keys):
            buckets.setdefault(k, []).append(i)
        batches = [b for idx in buckets.values() for b in _bucket_batches(idx, batch_size, groups, unit_batches)]
        self.batches = deal(batches, groups, world_size)[rank]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _bucket_batches(idx: list[int], batch_size: int, groups: Sequence[Hashable | None],
                    unit_batches: int) -> list[list[int]]:
    """Full batches in order, except one closed early where a windowed tile begins after
    `unit_batches` batches tied together (see UNIT_BATCHES)."""
    batches: list[list[int]] = []
    current: list[int] = []
    tied, last = 0, None       # batches tied since the last break; the last windowed tile seen
    for i in idx:
        g = groups[i]
        if g is not None and g != last:
            if current and tied + 1 >= unit_batches:
                batches.append(current)
                current, tied = [], 0
            last = g
        current.append(i)
        if len(current) == batch_size:
            batches.append(current)
            current, tied = [], tied + 1
    return batches + ([current] if current else [])


def deal(batches: list[list[int]], groups: Sequence[Hashable | None], world: int) -> list[list[list[int]]]:
    """The batches of each rank, in their global order.

    Batches that share a group (a windowed tile) form one unit; each unit goes to the rank with the
    fewest items so far (the lowest rank on ties), so a rank that took a large tile takes the
    next small ones later. With no groups and full batches this is plain round-robin.
    """
    units: list[list[list[int]]] = []
    unit_of: dict[Hashable, int] = {}
    for batch in batches:
        # A tile's windows are consecutive in one bucket: a batch continues at most the latest unit.
        unit = max((unit_of[g] for g in _groups(batch, groups) if g in unit_of), default=None)
        if unit is not None:
            units[unit].append(batch)
        else:
            unit = len(units)
            units.append([batch])
        for g in _groups(batch, groups):
            unit_of[g] = unit
    per_rank: list[list[list[int]]] = [[] for _ in range(world)]
    load = [0] * world
    for unit in units:
        rank = min(range(world), key=lambda r: (load[r], r))
        per_rank[rank] += unit
        load[rank] += sum(len(b) for b in unit)
    return per_rank


def _groups(batch: list[int], groups: Sequence[Hashable | None]) -> set[Hashable]:
    return {groups[i] for i in batch if groups[i] is not None}


def collate(items: list[Tile | TileFailure | WindowRef], multiple: int) -> Batch:
    """Stack the good tiles of one bucket, each reflect-padded to the bucket's size; windows stay references."""
    tiles = [t for t in items if isinstance(t, Tile)]
    failures = [t for t in items if isinstance(t, TileFailure)]
    refs = [t for t in items if isinstance(t, WindowRef)]
    batch = Batch(tiles=tiles, failures=failures, refs=refs,
                  progress=len(tiles) + len(failures) + sum(1 / r.of for r in refs))
    if tiles:
        batch.x = torch.from_numpy(stack_padded([t.array for t in tiles], multiple))
        batch.month = _ints([t.month for t in tiles])
        batch.biome = _ints([t.biome for t in tiles])
        batch.sizes = [tuple(t.array.shape[1:]) for t in tiles]
    return batch


def stack_padded(arrays: list[np.ndarray], multiple: int) -> np.ndarray:
    """(B, C, Hp, Wp) float32: each (C, H, W) array reflect-padded at the bottom and right to the next
    multiple of `multiple` (the values of stage2.model.pad_to_multiple), in one new array.

    Why NumPy and not torch.cat of padded tensors: the same 16 MiB batch of 256 px tiles took 1.3-1.8 ms
    with np.stack against 1.7-15 ms for torch.cat on one thread and a median of 124 ms on two threads
    while another process used the cores (its parallel copy waits for a descheduled thread).
    """
    shapes = {padded_size(a.shape[1], a.shape[2], multiple) for a in arrays}
    if len(shapes) != 1:         # the sampler guarantees one size; guard anyway
        raise RuntimeError(f"mixed padded sizes in one batch: {sorted(shapes)}")
    (hp, wp), c = shapes.pop(), arrays[0].shape[0]
    out = np.empty((len(arrays), c, hp, wp), dtype=np.float32)
    for dst, a in zip(out, arrays, strict=True):
        h, w = a.shape[1:]
        if (h, w) == (hp, wp):
            dst[...] = a
        else:
            dst[...] = np.pad(a, ((0, 0), (0, hp - h), (0, wp - w)), mode="reflect")
    return out


class _Collate:
    """Picklable collate_fn (DataLoader workers may be spawned)."""

    def __init__(self, multiple: int) -> None:
        self.multiple = multiple

    def __call__(self, items: list[Tile | TileFailure | WindowRef]) -> Batch:
        return collate(items, self.multiple)


class TileDataModule(L.LightningDataModule):
    """Owns the tile list, the size-bucketing sampler and the DataLoader for `trainer.predict`."""

    def __init__(self, *, files: Sequence[Path], input_dir: str | Path, batch_size: int, num_workers: int,
                 pin_memory: bool, patch_size: int, nan_policy: str, window: Mapping[str, Any],
                 input_scale: float | None, input_offset: float | None, clashes: Collection[str],
                 require_georeference: bool, states: Mapping[str, Mapping[str, Any]] | None = None,
                 unseen_conditioning: str, conditioning: Mapping[str, Any] | None = None) -> None:
        """`conditioning`: the checkpoint's record of the months and biomes it was trained on (None: none)."""
        super().__init__()
        self.conditioner = Conditioner.of(conditioning, unseen_conditioning)
        self.input_scale = input_scale
        self.input_offset = input_offset
        self.clashes = frozenset(clashes)      # output names of more than one input: those inputs fail
        self.require_georeference = require_georeference
        self.files = list(files)
        # A bucket's tiles are URLs, read through a local copy each (formats.load_remote_tile), with their
        # input_state from the run's listing (`states`, by key in input_dir).
        self.remote = is_url(input_dir)
        self.input_dir = str(input_dir).rstrip("/") if self.remote else Path(input_dir)
        self.states = dict(states or {})
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.patch_size = int(patch_size)
        self.nan_policy = str(nan_policy)
        self.window = WindowSettings(**window)
        self._plan: tuple[list[Item], list[Hashable], dict[int, Grid]] | None = None
        self._source: WindowSource | None = None
        # With fewer batches than devices some ranks get none; that is fine (see TileWriter.setup).
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def plan(self) -> tuple[list[Item], list[Hashable], dict[int, Grid]]:
        """Items, their bucket keys and the windowed tiles' grids, from the file headers (no pixel data is read)."""
        if self._plan is None:
            items, keys, grids = [], [], {}
            for i, shape in enumerate(self._shapes()):
                key = bucket_key(shape, self.patch_size)
                grid = None if key == "invalid" else grid_for(shape, self.window, self.patch_size)
                if grid is None:
                    items.append(Item(i))
                    keys.append(key)
                    continue
                grids[i] = grid
                items += [Item(i, k, grid.count) for k in range(grid.count)]
                keys += [padded_size(grid.win_h, grid.win_w, self.patch_size)] * grid.count
            self._plan = items, keys, grids
        return self._plan

    def _shapes(self) -> Iterator[tuple[int, ...] | None]:
        """Each file's shape from its header; a bucket's headers are fetched concurrently (each is a
        round trip or two: one after the other, 10,000 tiles would wait minutes on network latency)."""
        if not self.remote:
            return (peek_shape(f) for f in self.files)
        sizes = [self.states.get(relative_key(f, self.input_dir), {}).get("input_size") for f in self.files]
        with ThreadPoolExecutor(PEEK_THREADS) as pool:
            return iter(list(pool.map(peek_shape, self.files, sizes)))

    def bucket_keys(self) -> list[Hashable]:
        """One key per item: padded sizes from the NPZ headers."""
        return self.plan()[1]

    def sampler(self, rank: int, world: int) -> SizeBucketBatchSampler:
        items, keys, _ = self.plan()
        groups = [it.file if it.window is not None else None for it in items]
        return SizeBucketBatchSampler(keys, self.batch_size, rank, world, groups)

    def predict_dataloader(self) -> DataLoader:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        items, _, grids = self.plan()
        sampler = self.sampler(rank, world)
        reader = partial(load_remote_tile, states=self.states) if self.remote else load_tile
        load = Conditioned(partial(reader, input_dir=self.input_dir, nan_policy=self.nan_policy,
                                   input_scale=self.input_scale, input_offset=self.input_offset, clashes=self.clashes,
                                   require_georeference=self.require_georeference), self.conditioner)
        self._source = WindowSource(self.files, grids, load, partial(file_name, input_dir=self.input_dir))
        workers = min(self.num_workers, max(len(sampler), 0))
        return DataLoader(
            TileDataset(self.files, items, load),
            batch_sampler=sampler,
            collate_fn=_Collate(self.patch_size),
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False,
        )

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Main process: cut the batch's windows from their tiles (each tile read once, at its first window)."""
        if batch.refs:
            taken = [self._source.take(ref) for ref in batch.refs]
            batch.failures += [t for t in taken if isinstance(t, TileFailure)]
            batch.add_windows([t for t in taken if isinstance(t, Window)], self.patch_size)
        return batch

    def tiles_on_rank(self, rank: int, world: int) -> float:
        """Tiles this rank completes (a windowed tile's windows are all on one rank)."""
        items = self.plan()[0]
        return sum(1 / items[i].of for b in self.sampler(rank, world).batches for i in b)
