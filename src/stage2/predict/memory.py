"""How much memory a tile will need, estimated from its header before it is read (SPEC 5, 9).

A tile whose estimate exceeds the run's limit fails alone with a reason naming its size and the
limit, instead of the kernel killing the whole run (and every rerun) on it. Once tiles of any
size are refined in windows (SPEC 9), a windowed tile no longer needs this check: the data
module asks `MemoryBudget.too_large` in one place.

Measured peak host memory of one forward on the CPU in fp32 (stage2.model, inference mode),
above the loaded model, per padded pixel: prithvi_eo_tiny (decoder+refine channels 32+32) 694,
606 and 587 B/px at 256, 512 and 1024 px; prithvi_eo_v1_100 (64+64) 1370 and 1167 B/px at 256
and 512 px. The full-resolution decoder dominates: about 9.2 B per pixel per decoder+refine
channel, plus the input and output arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model import padded_size


@dataclass(frozen=True)
class MemoryBudget:
    """The estimate (bytes per padded pixel) and the limit it is held to."""

    bytes_per_pixel: float
    limit_bytes: int

    @classmethod
    def from_config(cls, *, bytes_per_pixel_channel: float, limit_gb: Any, available_fraction: float,
                    model_config: dict[str, Any]) -> MemoryBudget:
        """The budget of one run: the per-pixel need of this model, the limit from the config or the machine."""
        channels = int(model_config["decoder_channels"]) + int(model_config["refine_channels"])
        if str(limit_gb).strip().lower() == "auto":
            limit = int(available_fraction * available_memory())
        else:
            limit = int(float(limit_gb) * 2**30)
        return cls(bytes_per_pixel=bytes_per_pixel_channel * channels, limit_bytes=limit)

    def need(self, shape: tuple[int, ...], multiple: int) -> int:
        """Estimated peak bytes to refine a tile of `shape` (4, H, W) alone."""
        h, w = padded_size(int(shape[-2]), int(shape[-1]), multiple)
        return int(math.ceil(self.bytes_per_pixel * h * w))

    def too_large(self, shape: tuple[int, ...] | None, multiple: int) -> str | None:
        """The reason a tile of `shape` cannot be refined within the limit, or None when it fits (or is unknown)."""
        if shape is None or len(shape) != 3:
            return None         # the reader reports what is wrong with it
        need = self.need(shape, multiple)
        if need <= self.limit_bytes:
            return None
        return (f"tile {shape[1]}x{shape[2]} px would need about {_gb(need)} of memory to refine, "
                f"more than the limit of {_gb(self.limit_bytes)}")


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def available_memory() -> int:
    """Bytes this process can still use: MemAvailable, or less under a cgroup (container) limit."""
    avail = _meminfo_available()
    cg = _cgroup_room()
    candidates = [v for v in (avail, cg) if v is not None]
    return min(candidates) if candidates else 8 * 2**30     # unknown: assume a modest 8 GB machine


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """cgroup v2 memory.max - memory.current, None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


TILE_HINT = ("refine it in windows once tiles of any size are supported (SPEC 9), split it into smaller tiles, "
             "or raise tile_memory.limit_gb on a machine with more memory")
