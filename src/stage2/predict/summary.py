"""The run summary: counts and figures kept in one place, printed on one screen, saved as JSON.

Pure Python (no torch), so the "nothing to do" path can use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..runtime import EXIT_INTERRUPTED, EXIT_STOPPED
from ..store import FAILURES_FILE, SUMMARY_FILE, Store
from ..tiles import BANDS

FIRST_FAILURES = 5


@dataclass
class TileRecord:
    """What the summary needs of one finished tile (kept small: a run may have 100k tiles)."""

    name: str
    defaults: bool
    clipped: bool
    cpu_fallback: bool
    ndvi_rmse: float | None = None
    edge_preservation: float | None = None
    georeferenced: bool = True     # False: a COG written without CRS and transform (summary: not_georeferenced)
    std_mean: tuple[float | None, ...] | None = None    # per band, of its `confidence` (None: tta=none)
    std_p95: tuple[float | None, ...] | None = None
    mean_abs_change: float | None = None
    unseen_conditions: bool = False    # a month or biome the checkpoint never trained on (stage2.conditioning)
    missing_conditions: bool = False   # month or biome missing from the metadata


@dataclass
class RunSummary:
    found: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    ignored: int = 0
    redone_stale: int = 0          # tiles redone because their input changed since their output
    metadata_defaults: int = 0
    unseen_conditions: int = 0     # tiles with a month or biome the checkpoint never trained on (SPEC 6)
    missing_conditions: int = 0    # tiles whose month or biome is missing from the metadata
    clipped: int = 0
    cpu_fallbacks: int = 0
    not_georeferenced: int = 0     # COG outputs without CRS/transform (neither the GeoTIFF nor the sidecar had one)
    tiles_per_s: float = 0.0
    wall_s: float = 0.0
    device: str = "cpu"
    precision: str = "32-true"
    batch_size: int = 0
    model: str = ""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    checkpoint_fingerprint: dict[str, Any] = field(default_factory=dict)  # the next run reuses its sha256
    input_dir: str = ""
    output_dir: str = ""
    first_failures: list[dict[str, str]] = field(default_factory=list)
    quality: dict[str, Any] | None = None
    confidence: dict[str, Any] | None = None
    stage2_version: str = ""
    band_stats: dict[str, Any] | None = None   # per band, exact over every valid output of the folder
    handoff: dict[str, Any] | None = None      # what the tile list, TerraTorch file and catalog were built from
    stopped: str | None = None     # why the run stopped part-way (exit 3)
    interrupted: bool = False      # Ctrl-C or SIGTERM (exit 130)

    @property
    def left(self) -> int:
        """Tiles neither written, failed nor skipped (a stopped or interrupted run)."""
        return max(0, self.found - self.processed - self.skipped - self.failed)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, store: Store) -> str:
        """Write `_stage2_summary.json` whole; return where."""
        return store.write_json(SUMMARY_FILE, self.to_json())

    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.stopped:
            return EXIT_STOPPED
        return 1 if self.failed else 0

    def _conditions_line(self) -> list[str]:
        """Tiles the model ran on conditions it never learned or was not given, where there are any."""
        if not (self.unseen_conditions or self.missing_conditions):
            return []
        return [f"  conditions   {self.unseen_conditions} tiles with a month or biome the checkpoint never "
                f"trained on, {self.missing_conditions} with one missing (processing.conditioning in each JSON)"]

    def progress_line(self) -> str:
        """What a stopped or interrupted run did, for its one console line."""
        return (f"{self.processed} tiles written, {self.failed} failed, {self.skipped} already done, "
                f"{self.left} left; rerun the same command to finish")

    def format(self) -> str:
        """The one-screen summary printed at the end of a run."""
        lines = [
            "stage2 summary",
            f"  tiles        found {self.found}  processed {self.processed}  skipped {self.skipped}  "
            f"failed {self.failed}" + (f"  ignored {self.ignored}" if self.ignored else "")
            + (f"  redone (input changed) {self.redone_stale}" if self.redone_stale else ""),
            f"  metadata     defaults used for {self.metadata_defaults} tiles   clipped {self.clipped} tiles"
            + (f"   not georeferenced {self.not_georeferenced} COGs" if self.not_georeferenced else ""),
            *self._conditions_line(),
            f"  device       {self.device}   precision {self.precision}   batch {self.batch_size}   "
            f"CPU fallbacks {self.cpu_fallbacks}",
            f"  speed        {self.tiles_per_s:.2f} tiles/s (model, steady)   wall {self.wall_s:.1f} s",
        ]
        q = self.quality
        if q and q.get("tiles"):
            r, e = q["ndvi_rmse"], q["edge_preservation"]
            lines.append(f"  quality      NDVI RMSE mean {_f(r['mean'])} worst {_f(r['worst'])} ({r['worst_tile']})")
            lines.append(f"               edge pres. mean {_f(e['mean'])} worst {_f(e['worst'])} ({e['worst_tile']})")
            lines.append(f"               {q['below_target']} tiles below target, {q['undefined']} undefined (flat)")
        lines += _confidence_lines(self.confidence)
        if self.first_failures:
            lines.append(f"  failures     (all in {FAILURES_FILE})")
            for f in self.first_failures:
                lines.append(f"    {f['file']}: {f['reason']}")
        if self.handoff:
            h = self.handoff
            lines.append(f"  hand-off     {h['outputs']} outputs in _stage2_stac/, {h['tiles']} in _stage2_tiles.txt, "
                         "TerraTorch file " + ("written" if h["terratorch"] else "not written (no COGs)"))
        lines.append(f"  output       {self.output_dir}")
        return "\n".join(lines)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _confidence_lines(c: dict[str, Any] | None) -> list[str]:
    """The summary's confidence line(s): the mean change, and with a std its per-band mean and worst p95."""
    if not c or not c.get("tiles"):
        return []
    lines = [f"  confidence   tta {c['tta']}   mean |opt_v2 - opt_v1| {_f(c['mean_abs_change'])}"]
    bands = c.get("bands")
    if bands:
        means = " ".join(f"{b} {_f(v['std_mean'])}" for b, v in bands.items())
        worst = max(bands.values(), key=lambda v: -1.0 if v["std_p95_max"] is None else v["std_p95_max"])
        lines.append(f"               std mean {means}")
        lines.append(f"               std p95 worst {_f(worst['std_p95_max'])} ({worst['std_p95_max_tile']})")
    return lines


def confidence_summary(records: list[TileRecord], tta: str) -> dict[str, Any]:
    """The run's confidence: the mean of the tiles' mean changes and, with a std, per band the mean of
    the tiles' std means and the largest of their 95th percentiles (with that tile's name)."""
    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return sum(kept) / len(kept) if kept else None

    out: dict[str, Any] = {"tta": tta, "tiles": len(records),
                           "mean_abs_change": mean([r.mean_abs_change for r in records])}
    with_std = [r for r in records if r.std_mean is not None]
    if with_std:
        bands = {}
        for i, band in enumerate(BANDS):
            p95 = [(r.std_p95[i], r.name) for r in with_std if r.std_p95[i] is not None]
            worst = max(p95) if p95 else (None, None)
            bands[band] = {"std_mean": mean([r.std_mean[i] for r in with_std]),
                           "std_p95_max": worst[0], "std_p95_max_tile": worst[1]}
        out["bands"] = bands
    return out


def quality_summary(records: list[TileRecord]) -> dict[str, Any]:
    """Mean and worst of both metrics with the worst tiles' names, and the count below target."""
    from ..quality import EDGE_PRESERVATION_TARGET, NDVI_RMSE_TARGET, below_target

    def stats(key: str, worst_is_max: bool) -> dict[str, Any]:
        vals = [(getattr(r, key), r.name) for r in records if getattr(r, key) is not None]
        if not vals:
            return {"mean": None, "worst": None, "worst_tile": None}
        worst = max(vals) if worst_is_max else min(vals)
        return {"mean": sum(v for v, _ in vals) / len(vals), "worst": worst[0], "worst_tile": worst[1]}

    return {
        "tiles": len(records),
        "ndvi_rmse": {**stats("ndvi_rmse", True), "target_below": NDVI_RMSE_TARGET},
        "edge_preservation": {**stats("edge_preservation", False), "target_above": EDGE_PRESERVATION_TARGET},
        "below_target": sum(below_target({"ndvi_rmse": r.ndvi_rmse, "edge_preservation": r.edge_preservation})
                            for r in records),
        "undefined": sum(r.ndvi_rmse is None or r.edge_preservation is None for r in records),
    }
