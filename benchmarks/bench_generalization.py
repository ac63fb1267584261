"""Does the refiner generalize to Stage 1 errors it has not seen? Leave-one-kind-out (issue 17).

For each fold, trains the demo's recipe (prithvi_eo_tiny on examples/train_optical, CPU fp32,
`--epochs` epochs of 64 steps) with `degradation@degrade=family` and the fold's kinds excluded
(`degrade.exclude=[...]`), then degrades real tiles the model never saw (examples/demo_aoi, plus
`--extra-test-dir` folders) with each held-out kind alone, at the family's strengths, with
`--seeds`, refines them and compares input and output with the truth (RMSE). Every model is also
scored on the clean tiles (no harm) and under the product's own `translator` degradation (the
family's `translator` kind, off by default, is excluded from every fold: its chain overlaps the kinds).

Fold `none` trains on the whole family (the demo's `degradation@degrade=family` run) and fold
`translator` trains on the translator recipe (the demo before issue 17); both are scored on every
kind, so the table shows what training on the family buys over training on one simulator.

Trainings are cached: a fold whose `<out>/<fold>/refiner.pt` exists is not retrained.

usage: nice -n 19 python benchmarks/bench_generalization.py [--out bench_out/generalization] [--epochs 8]
         [--seeds 2024 2025] [--extra-test-dir ../shared/data/s2_real] [--folds geometry detail ...]
writes <out>/generalization.json and <out>/generalization.md (the README table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import stage2
from stage2.quality import rmse
from stage2.tiles import discover, read_tile
from stage2.train.degrade import degrade, load_config, tile_seed

REPO = Path(__file__).resolve().parents[1]
TRAIN_DIR = REPO / "examples" / "train_optical"
TEST_DIR = REPO / "examples" / "demo_aoi"
# kinds grouped into folds of related errors (5 trainings instead of 14 on 2 CPU cores)
FOLDS: dict[str, tuple[str, ...]] = {
    "geometry": ("shift", "misregistration"),
    "detail": ("blur", "smear"),
    "grain": ("texture", "noise", "speckle"),
    "colour": ("gain_offset", "contrast", "saturation", "colour_shift"),
    "haze_export": ("haze", "quantise", "jpeg"),
}
REFERENCE_FOLDS = ("none", "translator")     # trained on everything / on the translator recipe


def train(fold: str, out: Path, epochs: int) -> Path:
    """The fold's refiner (trained by `python -m stage2.train` as the demo does), cached on disk."""
    pt = out / fold / "refiner.pt"
    if pt.is_file():
        return pt
    if fold == "translator":
        recipe = ["degradation@degrade=translator"]
    else:
        held = ",".join([*FOLDS.get(fold, ()), "translator"])     # its chain overlaps the other kinds
        recipe = ["degradation@degrade=family", f"degrade.exclude=[{held}]"]
    cmd = [sys.executable, "-m", "stage2.train", "hardware=cpu", "precision=32", f"optical_dir={TRAIN_DIR}",
           "seed=0", f"trainer.max_epochs={epochs}", "trainer.max_time=00:00:50:00",
           "trainer.enable_progress_bar=false", *recipe,
           f"hydra.run.dir={out / fold / 'train'}", f"output_checkpoint={pt}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise SystemExit(f"training fold {fold} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    done = next((x for x in r.stdout.splitlines() if x.startswith("validation")), "")
    print(f"[{fold}] trained in {time.perf_counter() - t0:.0f} s; {done}", flush=True)
    return pt


def test_tiles(extra: list[Path]) -> list:
    """The real tiles of examples/demo_aoi and `extra` folders, less any tile the demo trains on (by name)."""
    seen = {f.stem for f in discover(TRAIN_DIR)[0]}
    tiles = []
    for folder in [TEST_DIR, *extra]:
        for f in discover(folder)[0]:
            if f.stem not in seen:
                seen.add(f.stem)
                tiles.append(read_tile(f, folder))
    return tiles


def refine(model: torch.nn.Module, arr: np.ndarray, tile) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(arr)[None], torch.tensor([tile.month]), torch.tensor([tile.biome]))[0].numpy()


def score(model: torch.nn.Module, tiles: list, params, seeds: list[int]) -> dict:
    """Mean RMSE of input and output to the truth over tiles x seeds, and how many samples got closer."""
    rin, rout = [], []
    for seed in seeds:
        for t in tiles:
            v1 = t.array if params is None else degrade(t.array, tile_seed(seed, t.name), params)
            v2 = refine(model, v1, t)
            rin.append(rmse(t.array, v1))
            rout.append(rmse(t.array, v2))
    rin_a, rout_a = np.array(rin), np.array(rout)
    return {"rmse_in": float(rin_a.mean()), "rmse_out": float(rout_a.mean()),
            "improved": int((rout_a < rin_a).sum()), "n": len(rin), "max_change": float(np.abs(rout_a - rin_a).max())}


def evaluate(fold: str, pt: Path, tiles: list, seeds: list[int]) -> dict:
    """The fold's model on each of its held-out kinds (every kind for the reference folds), translator, clean."""
    family, translator = load_config("family"), load_config("translator")
    model = stage2.load_model(pt).eval()
    kinds = FOLDS[fold] if fold in FOLDS else [k for k in family.active() if k != "translator"]
    res = {k: score(model, tiles, family.restricted(only=(k,), clean_fraction=0), seeds) for k in kinds}
    res["translator"] = score(model, tiles, translator, seeds)
    res["clean"] = score(model, tiles, None, seeds[:1])
    return res


def row(label: str, fold: str, s: dict, epochs: dict[str, int]) -> str:
    ratio = f"{s['rmse_out'] / s['rmse_in']:.3f}" if s["rmse_in"] > 0 else "-"
    return (f"| {label} | {fold} | {epochs.get(fold, '?')} | {s['rmse_in']:.4f} | {s['rmse_out']:.4f} | "
            f"{ratio} | {s['improved']}/{s['n']} |")


def trained_epochs(out: Path, fold: str) -> int | None:
    """Epochs the fold's model trained (from its train_summary.json: folds may differ)."""
    path = out / fold / "train" / "train_summary.json"
    return int(json.loads(path.read_text())["epochs"]) if path.is_file() else None


def markdown(results: dict, n_tiles: int, seeds: list[int], epochs: dict[str, int]) -> str:
    head = ["| error kind | model (kinds held out) | epochs | RMSE input | RMSE output | ratio | samples improved |",
            "|---|---|---|---|---|---|---|"]
    lines = [f"Leave-one-kind-out: {n_tiles} real test tiles never trained on x seeds {seeds}; the demo's "
             "recipe (epochs of 64 steps of 16 crops); each kind applied alone at the family's strengths.",
             "", *head]
    for fold in FOLDS:
        if fold in results:
            lines += [row(k, fold, results[fold][k], epochs) for k in FOLDS[fold]]
    lines += ["", "Every model on the clean tiles (no harm) and under the product's own degradation "
              "(translator recipe, unseen seeds):", "", *head]
    for fold, r in results.items():
        lines += [row("clean (no error)", fold, r["clean"], epochs), row("translator", fold, r["translator"], epochs)]
    for ref in REFERENCE_FOLDS:
        if ref in results:
            what = "the whole family" if ref == "none" else "the translator recipe"
            lines += ["", f"Model trained on `{ref}` ({what}), scored on every kind:", "", *head]
            lines += [row(k, ref, s, epochs) for k, s in results[ref].items() if k not in ("clean", "translator")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "generalization")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[2024, 2025])
    ap.add_argument("--extra-test-dir", type=Path, action="append", default=[])
    ap.add_argument("--folds", nargs="+", default=["none", *FOLDS, "translator"],
                    choices=[*FOLDS, *REFERENCE_FOLDS])
    args = ap.parse_args()
    tiles = test_tiles(args.extra_test_dir)
    print(f"{len(tiles)} test tiles: {', '.join(t.name for t in tiles)}", flush=True)
    results_path = args.out / "generalization.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for fold in args.folds:
        pt = train(fold, args.out, args.epochs)
        results[fold] = evaluate(fold, pt, tiles, args.seeds)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        scores = ", ".join(f"{k} {v['rmse_in']:.4f}->{v['rmse_out']:.4f}" for k, v in results[fold].items())
        print(f"[{fold}] {scores}", flush=True)
    ordered = {f: results[f] for f in [*FOLDS, *REFERENCE_FOLDS] if f in results}
    epochs = {f: e for f in ordered if (e := trained_epochs(args.out, f)) is not None}
    md = markdown(ordered, len(tiles), args.seeds, epochs)
    (args.out / "generalization.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
