"""`python -m stage2.evaluate truth_dir=DIR input_dir=DIR output_dir=DIR` (settings: conf/evaluate.yaml).

Prints per tile, on average and pooled the error of the Stage 1 input and of the Stage 2 output against
the truth (stage2.evaluate.score; `reference_dir`: another run's outputs, e.g. without TTA, beside),
saves the tables as `output_dir/_stage2_evaluation.json` (`save=false`: not), and one PNG per tile
(truth | opt_v1 | opt_v2 | their errors) in `output_dir/_stage2_evaluation/` (`figures=false`: none).
Exit 0, or 2 with one line on a bad folder or tile.
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..runtime import guarded, hydra_main, required
from ..store import mirrored, open_store
from .figures import write_figures
from .score import evaluate_dirs
from .table import format_evaluation

EVALUATION_FILE = "_stage2_evaluation.json"
FIGURES_DIR = "_stage2_evaluation"
FOLDERS = (("truth_dir", "the true optical tiles"),
           ("input_dir", "the Stage 1 tiles the run read"),
           ("output_dir", "the Stage 2 run's output_dir"))


def evaluate_app(cfg: DictConfig) -> int:
    """The evaluate command's steps: score, print the table, save the JSON and the figures.

    Any of the three folders may be an fsspec URL (docs/buckets.md): its files are downloaded for the scoring
    (every tile is read anyway), and the JSON and figures are uploaded into a bucket output_dir.
    """
    dirs = {key: required(cfg, key, what) for key, what in FOLDERS}
    reference = cfg.get("reference_dir")
    if reference not in (None, ""):
        dirs["reference_dir"] = str(reference)
    with ExitStack() as stack:
        local = {k: stack.enter_context(mirrored(v, skip=lambda key: key.startswith(f"{FIGURES_DIR}/")))
                 for k, v in dirs.items()}
        ev = evaluate_dirs(**local)
        out = open_store(dirs["output_dir"])
        made = local["output_dir"] if out.local else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="stage2-eval-")))
        figs = write_figures(ev, made / FIGURES_DIR) if cfg.figures else []
        if not out.local:
            out.upload(made, [p.relative_to(made).as_posix() for p in figs])
        ev.truth_dir, ev.input_dir, ev.output_dir = (str(dirs[k]) for k, _ in FOLDERS)
        if "reference_dir" in dirs:
            ev.reference_dir = dirs["reference_dir"]
    print(format_evaluation(ev))
    if cfg.save:
        text = json.dumps(_finite(ev.to_json()), indent=2, allow_nan=False) + "\n"
        print(f"saved {out.write_bytes(EVALUATION_FILE, text.encode('utf-8'))}")
    if cfg.figures:
        print(f"figures: {len(figs)} PNGs (truth | opt_v1 | opt_v2 | errors) in {out.uri(FIGURES_DIR)}")
    return 0


def run(cfg: DictConfig) -> int:
    """Score the run and print the table; exit code 0, or 2 on a bad folder or tile."""
    return guarded(lambda: evaluate_app(cfg), cfg, prog="stage2.evaluate")


main = hydra_main("evaluate", run)


def _finite(v: Any) -> Any:
    """JSON has no inf/NaN (identical tiles have an infinite PSNR): write null instead."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v
