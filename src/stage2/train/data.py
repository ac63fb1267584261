"""Training pairs (Stage 1 output, true optical) for `stage2.train`, and their LightningDataModule.

Two sources, usable alone or together:

- real pairs: `pairs_dir/<stem>.npz` holding `opt_v1` (a Stage 1 output) and `target` (the true
  optical image of the same place and date), both (4, H, W) in [0, 1] with the checks of SPEC 2,
  plus the usual optional `<stem>.json` sidecar (month, biome_code);
- simulated pairs: `optical_dir/<stem>.npz` holding true optical tiles in the `opt_v1` format;
  the input is made on the fly by `stage2.degrade` (a stand-in for a real Stage 1 model).

With both, `real_weight` (conf: data.real_weight) is the share of training crops cut from real
pairs (null: every pixel equally likely).

Training batches are random crops (with random flips and 90-degree turns, applied to both sides
of the pair); every crop and every degradation is drawn from a Generator seeded by
(seed, sample index), and the sampler numbers samples by epoch, so a run is reproducible and does
not depend on the worker count. Validation uses whole held-out tiles (a fixed share of each
source, chosen by a seeded shuffle of the tile names), each degraded once with `val_seed`.
Tiles are read from disk when sampled (nothing is cached), so a large folder does not fill RAM.

Conditions: a tile whose sidecar has no month trains the learned "unknown" month (0), not the
June predict writes for it; `month_dropout` / `biome_dropout` replace a training crop's month /
biome by "unknown" (0) with that probability, so the model also learns to refine without them
(SPEC 6). `condition_record` is what the checkpoint records of the months and biomes trained on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..checkpoint import conditioning_record
from ..conditioning import UNKNOWN_BIOME, UNKNOWN_MONTH
from ..tiles import INPUT_KEY, MIN_SIDE, TileError, _load_array, discover, read_sidecar, validate_array
from .degrade import Params, degrade, load_params, tile_seed
from .family import FamilyParams

log = logging.getLogger("stage2")

TARGET_KEY = "target"
_MARGIN = 4    # extra pixels around a simulated crop, so shift and blur see real neighbours, not padding


class PairError(ValueError):
    """A training file cannot be used; the message names the file and says what to do."""


@dataclass(frozen=True)
class PairSource:
    """One training tile: a real pair (opt_v1 + target in one NPZ) or a true optical tile to degrade."""

    path: Path
    simulated: bool
    height: int
    width: int
    month: int          # 1-12, or UNKNOWN_MONTH (0) where the sidecar has none
    biome: int

    @property
    def name(self) -> str:
        return self.path.stem


def _checked(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    try:
        return validate_array(arr)[0]
    except TileError as e:
        raise PairError(f"{path}: '{key}' {e.reason} ({e.hint})") from None


def read_pair(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(opt_v1, target) of a real pair, both float32 (4, H, W) in [0, 1], same shape; PairError if not."""
    path = Path(path)
    try:
        v1 = _load_array(path)
        with np.load(path, allow_pickle=False) as npz:
            if TARGET_KEY not in npz.files:
                raise PairError(f"{path}: no '{TARGET_KEY}' array (found keys: {list(npz.files)}): a real training "
                                f"pair holds the Stage 1 output as '{INPUT_KEY}' and the true optical as "
                                f"'{TARGET_KEY}'")
            target = npz[TARGET_KEY]
    except TileError as e:
        raise PairError(f"{path}: {e.reason} ({e.hint})") from None
    except ValueError as e:
        if isinstance(e, PairError):
            raise
        raise PairError(f"{path}: '{TARGET_KEY}' could not be read ({e}): store a plain float32 array") from None
    v1, target = _checked(v1, path, INPUT_KEY), _checked(target, path, TARGET_KEY)
    if v1.shape != target.shape:
        raise PairError(f"{path}: '{INPUT_KEY}' {v1.shape} and '{TARGET_KEY}' {target.shape} differ in shape: "
                        "both must cover the same pixels")
    return v1, target


def read_truth(path: str | Path) -> np.ndarray:
    """A true optical tile (opt_v1 format) as float32 (4, H, W) in [0, 1]; PairError if not.

    Read once per training sample: only the array (scan has already checked the sidecar).
    """
    try:
        return validate_array(_load_array(Path(path)))[0]
    except TileError as e:
        raise PairError(f"{path}: {e.reason} ({e.hint})") from None


def scan(folder: str | Path, simulated: bool) -> list[PairSource]:
    """Check every tile of a source folder once (so a bad file stops the run before training) and list it."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a directory"
        key = "optical_dir" if simulated else "pairs_dir"
        raise PairError(f"{key} {folder} {what}: point it at a folder of training tiles")
    files, _ = discover(folder)
    if not files:
        raise PairError(f"No NPZ tiles found in {folder}")
    out = []
    for f in files:
        arr = read_truth(f) if simulated else read_pair(f)[0]
        try:
            _, month, biome, defaults = read_sidecar(f)
        except TileError as e:
            raise PairError(f"{f}: {e.reason} ({e.hint})") from None
        month = UNKNOWN_MONTH if "month" in defaults else month
        out.append(PairSource(f, simulated, int(arr.shape[1]), int(arr.shape[2]), month, biome))
    return out


def split(sources: Sequence[PairSource], val_fraction: float, seed: int) -> tuple[list[PairSource], list[PairSource]]:
    """Hold out whole tiles for validation: ceil(fraction * n) of them (at least one training tile stays)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = min(math.ceil(val_fraction * len(sources)), len(sources) - 1) if val_fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(len(sources))
    val_idx = set(order[:n_val].tolist())
    return ([s for i, s in enumerate(sources) if i not in val_idx], [s for i, s in enumerate(sources) if i in val_idx])


def load_pair(src: PairSource, seed: int, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """A whole tile's (opt_v1, target); a simulated one degraded with the tile's own seed."""
    if src.simulated:
        truth = read_truth(src.path)
        return degrade(truth, tile_seed(seed, src.name), params), truth
    return read_pair(src.path)


def _augment(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip and 90-degree turn for every array: ground imagery has no up or left."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(1, 2))
        # always a copy: the crop may be a whole cached (read-only) tile
        out.append(np.array(a[:, :, ::-1] if flip else a, order="C"))
    return out


def _crop_window(rng: np.random.Generator, h: int, w: int, size: int) -> tuple[int, int]:
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def _reflect_to(a: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad a tile smaller than the crop up to it (tiles may be as small as 16 px)."""
    ph, pw = max(0, size - a.shape[1]), max(0, size - a.shape[2])
    if ph == 0 and pw == 0:
        return a
    return np.pad(a, ((0, 0), (0, ph), (0, pw)), mode="symmetric")


def checked_real_weight(value: Any) -> float | None:
    """`data.real_weight` as a float in [0, 1] (or None); ValueError naming the key otherwise."""
    if value is None:
        return None
    w = float(value)
    if not 0 <= w <= 1:
        raise ValueError(f"data.real_weight must be in [0, 1] (the share of crops from pairs_dir), got {w}")
    return w


def checked_share(value: Any, key: str) -> float:
    """A probability setting as a float in [0, 1]; ValueError naming the key otherwise."""
    p = float(value)
    if not 0 <= p <= 1:
        raise ValueError(f"{key} must be in [0, 1] (a probability), got {p}")
    return p


def sampling_weights(sources: Sequence[PairSource], real_weight: float | None) -> np.ndarray:
    """Each tile's chance to give a training crop: by area; with `real_weight` w, real pairs together
    get w and simulated tiles 1 - w (each by area within its side) when both kinds are present."""
    area = np.array([s.height * s.width for s in sources], dtype=np.float64)
    real = np.array([not s.simulated for s in sources])
    if real_weight is None or real.all() or not real.any():
        return area / area.sum()
    w = checked_real_weight(real_weight)
    return np.where(real, w * area / area[real].sum(), (1 - w) * area / area[~real].sum())


class TileCache:
    """Whole training tiles kept in memory up to `mb` megabytes (0: off), read-only, first come first kept.

    Why: every crop would otherwise read and inflate its whole NPZ again; for the demo's 64 px crops
    that was 4 of the 8 ms a crop cost, as much as half a training step of the tiny model on 2 cores.
    Each DataLoader worker holds its own cache.
    """

    def __init__(self, mb: float) -> None:
        self.budget = int(float(mb) * 2**20)
        self.used = 0
        self.items: dict[Path, Any] = {}

    def get(self, path: Path, read: Callable[[Path], Any]) -> Any:
        item = self.items.get(path)
        if item is not None:
            return item
        item = read(path)
        arrays = item if isinstance(item, tuple) else (item,)
        size = sum(a.nbytes for a in arrays)
        if self.used + size <= self.budget:
            for a in arrays:
                a.setflags(write=False)
            self.items[path] = item
            self.used += size
        return item


class RandomCropPairs(Dataset):
    """Sample index -> one random (opt_v1, target) crop, drawn from Generator(seed, index).

    Tiles are drawn in proportion to their area, so a 256 px tile is sampled about 4.5 times as
    often as a 120 px one and every pixel is equally likely to be seen.
    """

    def __init__(self, sources: Sequence[PairSource], crop: int, seed: int, params: Params,
                 real_weight: float | None = None, month_dropout: float = 0.0, biome_dropout: float = 0.0,
                 colour_jitter: float = 0.0, clean_every: int = 0, cache_mb: float = 0.0) -> None:
        if not sources:
            raise ValueError("no training tiles")
        self.sources = list(sources)
        self.crop = int(crop)
        self.seed = int(seed)
        self.params = params
        self.weights = sampling_weights(self.sources, real_weight)
        self.month_dropout, self.biome_dropout = float(month_dropout), float(biome_dropout)
        self.colour_jitter = float(colour_jitter)
        if clean_every == 1 or clean_every < 0:
            raise ValueError(f"data.clean_every must be 0 (off) or at least 2, got {clean_every}")
        self.clean_every = int(clean_every)
        self.cache = TileCache(cache_mb)
        # the last sample made: a clean twin follows its sample, so it is read from here, not made again
        self._last: tuple[int, dict[str, Any]] | None = None

    def source_at(self, index: int) -> PairSource:
        """The tile sample `index` is cut from (the first draw of its Generator, as __getitem__ does)."""
        twin = self.twin_of(int(index))
        return self._pick(np.random.default_rng([self.seed, int(index) if twin is None else twin]))

    def _pick(self, rng: np.random.Generator) -> PairSource:
        return self.sources[int(rng.choice(len(self.sources), p=self.weights))]

    def twin_of(self, index: int) -> int | None:
        """The sample whose clean twin sample `index` is (with `clean_every` k: every k-th), or None."""
        k = self.clean_every
        return index - 1 if k and index % k == k - 1 else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        twin = self.twin_of(int(index))
        if twin is None:
            item = self._sample(int(index))
            self._last = (int(index), item)
            return item
        # the same crop, augmentation and conditions as the sample before it, without its errors
        item = self._last[1] if self._last is not None and self._last[0] == twin else self._sample(twin)
        return {**item, "opt_v1": item["target"], "clean": torch.tensor(True)}

    def _sample(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, int(index)])
        src = self._pick(rng)
        if src.simulated:
            truth = _reflect_to(self.cache.get(src.path, read_truth), self.crop)
            size = min(self.crop + 2 * _MARGIN, truth.shape[1], truth.shape[2])
            y, x = _crop_window(rng, truth.shape[1], truth.shape[2], size)
            big = recoloured(truth[:, y:y + size, x:x + size], self.colour_jitter, [self.seed, int(index)])
            v1 = degrade(big, rng, self.params)
            # cut the margin (or what of it fits) so the crop is exactly `crop` px
            o = (size - self.crop) // 2
            v1, target = v1[:, o:o + self.crop, o:o + self.crop], big[:, o:o + self.crop, o:o + self.crop]
        else:
            v1, target = (_reflect_to(a, self.crop) for a in self.cache.get(src.path, read_pair))
            y, x = _crop_window(rng, v1.shape[1], v1.shape[2], self.crop)
            v1, target = v1[:, y:y + self.crop, x:x + self.crop], target[:, y:y + self.crop, x:x + self.crop]
        v1, target = _augment([v1, target], rng)
        # drawn last, both coins always: the crop and its errors do not depend on the dropout settings
        drop_month, drop_biome = rng.random() < self.month_dropout, rng.random() < self.biome_dropout
        return {"opt_v1": torch.from_numpy(v1), "target": torch.from_numpy(target),
                "month": _long(UNKNOWN_MONTH if drop_month else src.month),
                "biome": _long(UNKNOWN_BIOME if drop_biome else src.biome),
                "clean": torch.tensor(bool(np.array_equal(v1, target)))}


def recoloured(truth: np.ndarray, jitter: float, key: list[int]) -> np.ndarray:
    """The true crop in other colours, for both sides of the pair: its contrast around its own mean
    scaled by exp(N(0, jitter)) and each band by exp(N(0, jitter)), clipped to [0, 1] - a scene as
    another source, season or sensor would show it.

    Why: without it, the colours of the training tiles are all the refiner knows of "correct", so an
    unfamiliar clean scene reads as an error; and a low-contrast clean scene must not look degraded
    (the product's recipe lowers contrast), so only the error's own traces (noise, blur) tell.
    Drawn from its own stream (`key` plus 1), so the crop and its errors are those of jitter 0.
    """
    if jitter <= 0:
        return truth
    draws = np.random.default_rng([*key, 1]).normal(0.0, jitter, truth.shape[0] + 1)
    mean = truth.mean(axis=(1, 2), keepdims=True)
    out = (mean + np.exp(draws[-1]) * (truth - mean)) * np.exp(draws[:-1])[:, None, None]
    return np.clip(out, 0.0, 1.0).astype(truth.dtype)


def _long(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.long)


class WholeTilePairs(Dataset):
    """Validation: every held-out tile whole, degraded once (seeded by val_seed and the tile's name),
    then every one of them clean (its truth as the input: how far the refiner moves a tile that needs
    nothing). Items carry `clean` to tell the two apart."""

    def __init__(self, sources: Sequence[PairSource], seed: int, params: Params) -> None:
        self.sources = list(sources)
        self.seed = int(seed)
        self.params = params

    def __len__(self) -> int:
        return 2 * len(self.sources)

    def __getitem__(self, index: int) -> dict[str, Any]:
        src = self.sources[index % len(self.sources)]
        clean = index >= len(self.sources)
        if clean:
            target = read_truth(src.path) if src.simulated else read_pair(src.path)[1]
            v1 = target
        else:
            v1, target = load_pair(src, self.seed, self.params)
        return {"opt_v1": torch.from_numpy(v1), "target": torch.from_numpy(target),
                "month": _long(src.month), "biome": _long(src.biome), "name": src.name, "clean": clean}


class EpochSampler(Sampler[int]):
    """Sample indices `samples_per_epoch` per epoch, new ones every epoch, split across ranks.

    Lightning calls `set_epoch` before each epoch; index = (epoch * samples_per_epoch + k) so
    the crop drawn for a given step is the same in every run with the same seed. With several
    devices each rank takes every world_size-th index (Lightning's sampler replacement is off).
    """

    def __init__(self, samples_per_epoch: int, rank: int = 0, world_size: int = 1) -> None:
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.n = int(samples_per_epoch)
        self.rank, self.world = int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.n
        return iter(range(start + self.rank, start + self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class PairDataModule(L.LightningDataModule):
    """Real and/or simulated training pairs: random crops for training, whole held-out tiles for validation."""

    def __init__(self, *, pairs_dir: str | Path | None, optical_dir: str | Path | None, crop: int, batch_size: int,
                 samples_per_epoch: int, val_fraction: float, seed: int, val_seed: int,
                 degrade: Mapping[str, Any] | Params, num_workers: int, pin_memory: bool,
                 real_weight: float | None, month_dropout: float, biome_dropout: float,
                 colour_jitter: float, clean_every: int, cache_mb: float) -> None:
        """Settings from conf/train.yaml's `data` and `degrade` (the app checks crop against the patch size)."""
        super().__init__()
        if pairs_dir in (None, "") and optical_dir in (None, ""):
            raise PairError("no training data: set pairs_dir=DIR (real Stage 1 / optical pairs) and/or "
                            "optical_dir=DIR (true optical tiles, degraded on the fly)")
        if crop < MIN_SIDE:
            raise ValueError(f"crop must be at least {MIN_SIDE} px (a multiple of the model's patch size), got {crop}")
        self.pairs_dir = None if pairs_dir in (None, "") else Path(pairs_dir)
        self.optical_dir = None if optical_dir in (None, "") else Path(optical_dir)
        self.crop, self.batch_size = int(crop), int(batch_size)
        self.samples_per_epoch = int(samples_per_epoch)
        self.val_fraction = float(val_fraction)
        self.seed, self.val_seed = int(seed), int(val_seed)
        self.params = degrade if not isinstance(degrade, Mapping) else load_params(degrade)
        self.real_weight = checked_real_weight(real_weight)
        self.month_dropout = checked_share(month_dropout, "data.month_dropout")
        self.biome_dropout = checked_share(biome_dropout, "data.biome_dropout")
        if colour_jitter < 0:
            raise ValueError(f"data.colour_jitter must be >= 0 (sd of the log band gain), got {colour_jitter}")
        self.colour_jitter = float(colour_jitter)
        self.clean_every = int(clean_every)
        self.cache_mb = float(cache_mb)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.train_sources: list[PairSource] = []
        self.val_sources: list[PairSource] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_sources:
            return
        for folder, simulated in ((self.pairs_dir, False), (self.optical_dir, True)):
            if folder is None:
                continue
            train, val = split(scan(folder, simulated), self.val_fraction, self.seed)
            self.train_sources += train
            self.val_sources += val
        log.info("training on %d tiles, validating on %d held-out tiles (%s)", len(self.train_sources),
                 len(self.val_sources), ", ".join(s.name for s in self.val_sources) or "none")

    def condition_record(self) -> dict[str, Any]:
        """The checkpoint's record of the conditions trained on: the training tiles' known months and their biomes."""
        return conditioning_record([s.month for s in self.train_sources if s.month != UNKNOWN_MONTH],
                                   [s.biome for s in self.train_sources],
                                   month_dropout=self.month_dropout, biome_dropout=self.biome_dropout)

    def _rank(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        return DataLoader(
            RandomCropPairs(self.train_sources, self.crop, self.seed, self.params, self.real_weight,
                            self.month_dropout, self.biome_dropout, self.colour_jitter, self.clean_every,
                            self.cache_mb),
            batch_size=self.batch_size, sampler=EpochSampler(self.samples_per_epoch, rank, world),
            num_workers=self.num_workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=False, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        rank, world = self._rank()
        # whole tiles differ in size: one per batch; each rank validates its share. The family's clean
        # share is off here: every tile is also scored clean, on its own.
        params = self.params
        if isinstance(params, FamilyParams):
            params = params.restricted(only=params.only, exclude=params.exclude, clean_fraction=0.0)
        return DataLoader(WholeTilePairs(self.val_sources[rank::world], self.val_seed, params),
                          batch_size=1, num_workers=min(self.num_workers, 1), collate_fn=_collate_one)


def _collate_one(items: list[dict[str, Any]]) -> dict[str, Any]:
    (item,) = items
    return {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else [v]) for k, v in item.items()}
