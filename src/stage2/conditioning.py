"""What month and biome the model is given for a tile, and whether the checkpoint knows them (SPEC 6).

A checkpoint of stage2.train records the months and biomes it was trained on
(stage2.checkpoint.conditioning_record). For such a checkpoint, predict gives the model the
learned "unknown" (month 0, biome 0) where the tile's metadata is missing, and, with
`unseen_conditioning: unknown` (the default), where the value was never trained on: an embedding
the model never saw is still its zero initialisation, and its month / biome shift is a guess.
`as_is` passes unseen values through. A checkpoint without the record gets the tile's values as
before (a missing month is June, a missing biome 0). The JSON keeps the tile's own values either way.

Each tile's `processing.conditioning` says, per key, the tile's value, what the model was given
(`model`: the value, or "unknown") and its `status`: `seen`, `unseen`, `missing` (not in the
metadata) or `not_recorded` (the checkpoint has no record to tell).

Pure Python: DataLoader workers apply it where tiles are read.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

UNKNOWN_MONTH = 0       # the model's "unknown" month: an embedding row of its own (stage2.model)
UNKNOWN_BIOME = 0       # biome 0: the guide's "open water or unknown"
POLICIES = ("unknown", "as_is")
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Conditioner:
    """The seen sets of a checkpoint (None: it has no record) and the unseen policy."""

    months: frozenset[int] | None = None
    biomes: frozenset[int] | None = None
    unseen: str = "unknown"

    @classmethod
    def of(cls, record: Mapping[str, Any] | None, unseen: str = "unknown") -> Conditioner:
        """From a checkpoint's conditioning record (or None) and `unseen_conditioning`."""
        if unseen not in POLICIES:
            raise ValueError(f"unseen_conditioning={unseen!r} is not one of {', '.join(POLICIES)}")
        if record is None:
            return cls(unseen=unseen)
        return cls(frozenset(int(m) for m in record["months"]), frozenset(int(b) for b in record["biomes"]), unseen)

    @property
    def recorded(self) -> bool:
        return self.months is not None

    def resolve(self, month: int, biome: int, defaults: Collection[str]) -> tuple[int, int, dict[str, Any]]:
        """(month index, biome index) for the model and the tile's `processing.conditioning`."""
        m_index, m_info = self._one(month, "month" in defaults, self.months, UNKNOWN_MONTH)
        b_index, b_info = self._one(biome, "biome_code" in defaults, self.biomes, UNKNOWN_BIOME)
        return m_index, b_index, {"month": m_info, "biome_code": b_info}

    def _one(self, value: int, missing: bool, seen: frozenset[int] | None, unknown: int) -> tuple[int, dict[str, Any]]:
        if seen is None:
            status = "missing" if missing else "not_recorded"
            return value, {"value": value, "model": value, "status": status}
        status = "missing" if missing else ("seen" if value in seen else "unseen")
        to_unknown = missing or (status == "unseen" and self.unseen == "unknown")
        index = unknown if to_unknown else value
        return index, {"value": value, "model": UNKNOWN if index == unknown else index, "status": status}


def counts(conditioning: Mapping[str, Any] | None) -> tuple[bool, bool]:
    """(any value unseen, any value missing) of one tile's `processing.conditioning`."""
    if not conditioning:
        return False, False
    statuses = [conditioning[k]["status"] for k in ("month", "biome_code") if k in conditioning]
    return "unseen" in statuses, "missing" in statuses
