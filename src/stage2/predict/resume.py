"""What a rerun trusts (SPEC 4): which outputs in output_dir count as done for this run.

An output is done only when its JSON exists (written last), its data files are complete (an NPZ's
zip directory at the end of the file is readable, a COG's blocks all lie inside the file, and each
has the input's shape), it was made
with this run's checkpoint (`processing.checkpoint_sha256`), and its input has not changed since
(`input_size`, `input_mtime`, and the same of its sidecar). Reading a JSON and two NPZ headers
per tile keeps this cheap: no pixel data is read, no torch is imported.

Outputs of another checkpoint are a run-level error (exit 2) while skip_existing=true: a folder
never silently mixes two checkpoints. Outputs that are not trusted and will be redone are
removed before the run writes anything new, so a tile that now fails leaves no stale output.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import formats
from ..formats import cog
from ..runtime import RunError
from ..tiles import OUTPUT_KEY, input_state, is_reserved, output_paths, peek_shape, tile_name

log = logging.getLogger("stage2")

DONE, MISSING, INCOMPLETE, STALE, FOREIGN = "done", "missing", "incomplete", "stale", "foreign"


@dataclass
class RerunPlan:
    """Each tile's verdict, and what the run does with them."""

    todo: list[Path] = field(default_factory=list)
    done: int = 0
    untrusted: list[str] = field(default_factory=list)      # names of outputs that exist but will be redone
    stale: int = 0                                          # of those, inputs changed since (redone_stale)
    foreign: dict[str, Any] = field(default_factory=dict)   # name -> that output's `processing`


def verdict(output_dir: Path, name: str, input_path: Path, sha256: str,
            output_format: str) -> tuple[str, dict[str, Any]]:
    """(DONE | MISSING | INCOMPLETE | STALE | FOREIGN, the output's `processing`) of one tile.

    Every data file of `output_format` must be there and whole (an NPZ's zip directory, a COG's
    last block inside the file) with the input's shape: a JSON of an NPZ run does not make a COG done.
    """
    *data, js_key = formats.output_keys(name, output_format)
    js = output_dir / js_key
    if is_reserved(name):       # fails as a tile; its "output" names are the run's own files
        return MISSING, {}
    if not js.is_file():
        return (INCOMPLETE if any((output_dir / k).exists() for k in data) else MISSING), {}
    try:
        processing = json.loads(js.read_text(encoding="utf-8")).get("processing")
    except (OSError, ValueError, AttributeError):
        processing = None
    if not isinstance(processing, dict):
        return INCOMPLETE, {}
    want = formats.peek_shape(input_path)
    if want is None or any(_output_shape(output_dir / k) != want for k in data):   # cut short, damaged, another's
        return INCOMPLETE, processing
    if processing.get("checkpoint_sha256") != sha256:
        return FOREIGN, processing
    try:
        now = input_state(input_path)
    except OSError:
        return STALE, processing
    if any(processing.get(k) != v for k, v in now.items()):
        return STALE, processing
    return DONE, processing


def _output_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of an output data file from its header, None when it is missing or cut short."""
    return peek_shape(path, OUTPUT_KEY) if path.suffix == formats.NPZ_SUFFIX else cog.complete_shape(path)


def decide(files: list[Path], input_dir: Path, output_dir: Path, sha256: str, skip_existing: bool,
           output_format: str) -> RerunPlan:
    """The verdict of every tile; with skip_existing=false every tile is redone."""
    plan = RerunPlan()
    counts: Counter[str] = Counter()
    for f in files:
        name = tile_name(f, input_dir)
        kind, processing = verdict(output_dir, name, f, sha256, output_format)
        counts[kind] += 1
        if kind == DONE and skip_existing:
            plan.done += 1
            continue
        plan.todo.append(f)
        if kind in (INCOMPLETE, STALE, FOREIGN):
            plan.untrusted.append(name)
        if kind == STALE:
            plan.stale += 1
        if kind == FOREIGN:
            plan.foreign[name] = processing
    if counts[INCOMPLETE] or counts[STALE]:
        log.info("rerun: %d incomplete outputs and %d whose input changed are redone",
                 counts[INCOMPLETE], counts[STALE])
    return plan


def foreign_error(plan: RerunPlan, output_dir: Path, checkpoint: Path, sha256: str) -> RunError:
    """The run-level error for outputs of another checkpoint, naming both checkpoints and the fix."""
    theirs = Counter((p.get("checkpoint"), p.get("checkpoint_sha256")) for p in plan.foreign.values())
    (path, sha), _ = theirs.most_common(1)[0]
    other = (f"checkpoint {path} (sha256 {sha[:12]})" if sha else
             f"an unrecorded checkpoint ({path or 'unknown'}; written before stage2 recorded fingerprints)")
    more = f" and {len(theirs) - 1} other checkpoint(s)" if len(theirs) > 1 else ""
    example = sorted(plan.foreign)[0]
    return RunError(f"output_dir {output_dir} holds {len(plan.foreign)} outputs (e.g. {example}.json) made with "
                    f"{other}{more}; this run's checkpoint is {checkpoint} (sha256 {sha256[:12]}): "
                    "choose another output_dir, or pass skip_existing=false to redo them with this checkpoint")


def discard(output_dir: Path, names: list[str]) -> None:
    """Remove the outputs that will be redone, of every format (JSON first: data files alone are never trusted)."""
    for name in names:
        npz, js = output_paths(output_dir, name)
        js.unlink(missing_ok=True)
        npz.unlink(missing_ok=True)
        (output_dir / cog.output_key(name)).unlink(missing_ok=True)
    if names:
        log.info("removed %d outputs that are redone (incomplete, stale or of another checkpoint)", len(names))
