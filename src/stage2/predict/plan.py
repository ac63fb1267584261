"""The plan of a predict run: everything decided before any tile is read, in one typed record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import Entry, Store


@dataclass
class Plan:
    """What the run will do. Filled by the app's `plan` (paths, stores) and by `resume.trust` under the lock."""

    input_dir: Path | str            # a local folder, or an fsspec URL
    output_dir: Path | str
    checkpoint: Path
    inputs: Store
    outputs: Store
    files: list[Path | str] = field(default_factory=list)     # every tile input: Paths, or URLs in a bucket
    ignored: list[Path] = field(default_factory=list)         # named like tiles but not files
    todo: list[Path | str] = field(default_factory=list)
    done: int = 0
    stale: int = 0                   # redone because their input changed (summary: redone_stale)
    untrusted: list[str] = field(default_factory=list)        # names of existing outputs that are redone
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the checkpoint's (checkpoint.fingerprint)
    clashes: set[str] = field(default_factory=set)   # output names of more than one input (a.npz + a.tif): all fail
    states: dict[str, dict[str, Any]] = field(default_factory=dict)   # input key -> its input_state
    listing: dict[str, Entry] = field(default_factory=dict)           # the output folder's, made under the lock
    index: dict[str, dict[str, Any]] = field(default_factory=dict)    # finished tiles a rerun trusts
    index_changed: bool = False      # the index must be written again (JSONs were read to fill it)
    tta: str = ""                    # the run's `tta` (set by resume.trust): outputs of another are redone
    previous_summary: dict[str, Any] | None = None   # the last run's `_stage2_summary.json`, if readable
