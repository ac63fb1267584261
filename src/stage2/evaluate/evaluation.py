"""What an evaluation found: per tile the scores of opt_v1 and opt_v2 against the truth, and the
run's aggregates (mean over tiles, pooled over pixels, the per-tile RMSE ratios, the std's ranking of
the error, a reference run's RMSE), with its JSON form and its closing line. Filled by
stage2.evaluate.score; shown by stage2.evaluate.table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..quality import LOWER_IS_BETTER, METRICS

EVAL_METRICS = (*METRICS, "ssim", "sam")
LOWER = {**LOWER_IS_BETTER, "ssim": False, "sam": True}
WORSE_BY = 0.02                         # a tile whose RMSE ratio exceeds 1 + this got worse
# For scale only: DSen2-CR (Meraner et al. 2020, ISPRS J. Photogramm. Remote Sens. 166) on its own
# SEN12MS-CR test set, all 13 bands, removing real clouds: another task on other data.
LITERATURE = {"DSen2-CR": {"psnr": 28.7, "ssim": 0.875, "sam": 8.15,
                           "what": "cloud removal, Meraner et al. 2020, SEN12MS-CR test set, 13 bands"}}


@dataclass
class TileScore:
    name: str
    before: dict[str, float | None]    # opt_v1 against the truth
    after: dict[str, float | None]     # opt_v2 against the truth
    pixels: int = 0                    # pixels scored (with data in truth, opt_v1 and opt_v2)
    confidence: dict[str, Any] | None = None   # outputs with a std: std_mean, spearman, pixels
    reference: dict[str, float | None] | None = None   # reference_dir's output: its rmse

    @property
    def rmse_ratio(self) -> float | None:
        """RMSE(opt_v2) / RMSE(opt_v1): below 1 Stage 2 brought the tile closer to the truth."""
        b, a = self.before["rmse"], self.after["rmse"]
        return a / b if a is not None and b else None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "before": self.before, "after": self.after, "rmse_ratio": self.rmse_ratio,
                "pixels": self.pixels, "confidence": self.confidence, "reference": self.reference}


@dataclass
class Evaluation:
    truth_dir: str
    input_dir: str
    output_dir: str
    tiles: list[TileScore] = field(default_factory=list)
    reference_dir: str | None = None
    tta: str | None = None              # the outputs' processing.tta ("none" for runs without it)
    reference_tta: str | None = None
    pooled: dict[str, Any] = field(default_factory=dict)
    spearman_pooled: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def mean(self, which: str, metric: str) -> float | None:
        vals = [getattr(t, which)[metric] for t in self.tiles]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        return float(np.mean(vals)) if vals else None

    def improved(self, metric: str = "rmse") -> int:
        """How many tiles the output brought closer to the truth by `metric`."""
        n = 0
        for t in self.tiles:
            b, a = t.before[metric], t.after[metric]
            if b is not None and a is not None:
                n += (a < b) if LOWER[metric] else (a > b)
        return n

    def ratios(self) -> dict[str, Any]:
        """The per-tile RMSE ratios: median, worst (and its tile), and how many tiles got worse by more than 2 %."""
        got = [(t.rmse_ratio, t.name) for t in self.tiles if t.rmse_ratio is not None]
        if not got:
            return {"median": None, "worst": None, "worst_tile": None, "worse": 0, "worse_by": WORSE_BY, "tiles": 0}
        worst = max(got, key=lambda rn: (rn[0], rn[1]))
        return {"median": float(np.median([r for r, _ in got])), "worst": worst[0], "worst_tile": worst[1],
                "worse": sum(r > 1 + WORSE_BY for r, _ in got), "worse_by": WORSE_BY, "tiles": len(got)}

    def has_std(self) -> bool:
        return any(t.confidence is not None for t in self.tiles)

    def mean_of(self, part: str, key: str) -> float | None:
        """Mean over tiles of `confidence` or `reference` entries."""
        vals = [(getattr(t, part) or {}).get(key) for t in self.tiles]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    def to_json(self) -> dict[str, Any]:
        return {"truth_dir": self.truth_dir, "input_dir": self.input_dir, "output_dir": self.output_dir,
                "reference_dir": self.reference_dir, "tta": self.tta, "reference_tta": self.reference_tta,
                "tiles": [t.to_json() for t in self.tiles],
                "mean": {w: {m: self.mean(w, m) for m in EVAL_METRICS} for w in ("before", "after")},
                "improved": {m: self.improved(m) for m in EVAL_METRICS},
                "pooled": self.pooled, "rmse_ratio": self.ratios(),
                "confidence": self.confidence_json(), "literature": LITERATURE, "notes": self.notes}

    def confidence_json(self) -> dict[str, Any] | None:
        if not self.has_std() and self.reference_dir is None:
            return None
        return {"std_mean": self.mean_of("confidence", "std_mean"),
                "spearman_mean": self.mean_of("confidence", "spearman"),
                "spearman_pooled": self.spearman_pooled,
                "reference_rmse_mean": self.mean_of("reference", "rmse")}

    def verdict(self) -> str:
        """The closing line: the median and the worst per-tile RMSE ratio first, then the pooled and mean figures."""
        n = len(self.tiles)
        b, a = self.mean("before", "rmse"), self.mean("after", "rmse")
        if b is None or a is None:
            return "no tiles compared"
        r = self.ratios()
        pb, pa = self.pooled["before"]["rmse"], self.pooled["after"]["rmse"]
        if pb is None or pa is None:
            return "no pixels compared (no data everywhere)"
        if r["median"] is not None:
            head = (f"RMSE(opt_v2)/RMSE(opt_v1) per tile: median {r['median']:.3f}, worst {r['worst']:.3f} "
                    f"({r['worst_tile']}); {r['worse']} of {r['tiles']} tiles worse by more than "
                    f"{100 * WORSE_BY:.0f} %. ")
        else:
            head = "RMSE ratio undefined (every input equals its truth). "
        word = "closer to" if pa < pb else "NOT closer to"
        nb, na = self.mean("before", "ndvi_rmse"), self.mean("after", "ndvi_rmse")
        return (f"{head}Stage 2 output is {word} the truth: pooled RMSE {pb:.4f} -> {pa:.4f} ({_change(pb, pa)}), "
                f"mean RMSE {b:.4f} -> {a:.4f} ({_change(b, a)}), mean NDVI RMSE {_f(nb)} -> {_f(na)}; "
                f"RMSE improved on {self.improved('rmse')} of {n} tiles")


def _change(b: float, a: float) -> str:
    return f"{100 * (a - b) / b:+.1f} %" if b > 0 else "n/a"


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
