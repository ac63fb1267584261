"""The demo's training recipe, lever by lever: no harm to clean tiles, and a real gain under the product's degradation.

Each recipe is the demo's training command (`python -m stage2.train hardware=cpu precision=32
optical_dir=examples/train_optical seed=0`, the tiny model on 2 CPU cores) plus its own overrides. Each
trained refiner is scored on real tiles it never trained on, as predict would run it (a missing or
unseen month or biome becomes the learned "unknown" for a checkpoint that records its conditions,
stage2.conditioning):

- the demo's held-back tiles (examples/demo_aoi), the training run's own validation tiles (held out
  of training) and `--extra-test-dir` folders (e.g. ../shared/data/s2_real: its Sen1Floods11 tiles are
  a source and a product level the demo never trains on), less any tile the recipe trained on;
- **degraded** by the product's own recipe (conf/degradation/translator.yaml, `stage2.degrade`) with
  `--seeds` the training never uses: per (tile, seed) the ratio RMSE(opt_v2) / RMSE(opt_v1) to the
  truth: median, worst, how many are worse by more than 2 %, and the pooled RMSE (all pixels);
- **clean** (the truth as the input), whole and as a 64 px centre crop (EuroSAT's patch size): how
  far the refiner moves a tile that needs nothing (RMSE between opt_v2 and opt_v1): mean over the
  whole tiles, worst over whole tiles and crops;
- a probe of colours no training tile has: the clean tiles with red and NIR 1.4x brighter, and with
  the visible bands 0.75x and NIR 1.3x (RECOLOUR; not real imagery): worst change.

`--leave-out PREFIX` trains without the training tiles whose names start with PREFIX (a copy of
examples/train_optical without them) and scores every tile of that source too: a source never seen.

Trainings are cached: a recipe whose `<out>/<name>/refiner.pt` exists is not retrained. Timing:
train_summary.json's wall time and steps; on a loaded machine compare steps/s of recipes run side
by side, not wall times across hours.

usage: python benchmarks/bench_recipe.py [--out bench_out/recipe] [--seeds 2024 2025 2026]
          [--extra-test-dir ../shared/data/s2_real] [--leave-out ben] RECIPE ...
  RECIPE: name=override;override;...  (e.g. "clean50=degrade.clean_fraction=0.5"), or a name of RECIPES
writes <out>/recipe.json and prints the table (one row per recipe) in the docs' format.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import stage2
from stage2.conditioning import Conditioner
from stage2.tiles import discover, read_tile
from stage2.train.degrade import degrade, load_config, tile_seed

REPO = Path(__file__).resolve().parents[1]
TRAIN_DIR = REPO / "examples" / "train_optical"
TEST_DIR = REPO / "examples" / "demo_aoi"
WORSE = 1.02
CROP = 64
# Clean tiles in colours no training tile has (a probe, not real imagery): red and NIR 1.4x brighter (a
# bright crop field), and every band 0.75x with NIR 1.3x (dense green vegetation).
RECOLOUR = {"bright_red_nir": (1.0, 1.0, 1.4, 1.4), "dark_vis_bright_nir": (0.75, 0.75, 0.75, 1.3)}

# The demo's command line before its recipe, as the Makefile runs it.
DEMO = ["hardware=cpu", "precision=32", "seed=0", "trainer.max_epochs=8", "trainer.max_time=00:01:00:00",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"]


def parse_recipe(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    return name, [o for o in rest.split(";") if o]


def train(name: str, overrides: list[str], out: Path, optical_dir: Path) -> Path:
    """The recipe's refiner, trained by `python -m stage2.train` as the demo does, cached on disk."""
    pt = out / name / "refiner.pt"
    if pt.is_file():
        return pt
    cmd = [sys.executable, "-m", "stage2.train", *DEMO, f"optical_dir={optical_dir}", *overrides,
           f"hydra.run.dir={out / name / 'train'}", f"output_checkpoint={pt}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise SystemExit(f"training {name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return pt


def training_dir(out: Path, leave_out: str | None) -> Path:
    """examples/train_optical, or a copy of it without the tiles whose names start with `leave_out`."""
    if not leave_out:
        return TRAIN_DIR
    folder = out / f"_train_without_{leave_out}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for f in TRAIN_DIR.iterdir():
            if f.suffix in (".npz", ".json") and not f.name.startswith(leave_out):
                shutil.copy(f, folder / f.name)
    return folder


def test_tiles(out: Path, name: str, extra: list[Path], optical_dir: Path) -> list:
    """Every tile of the test folders and the run's validation tiles that the recipe did not train on."""
    summary = json.loads((out / name / "train" / "train_summary.json").read_text())
    trained = set(summary["train_tiles"])
    tiles, seen = [], set()
    for folder in [TEST_DIR, optical_dir, TRAIN_DIR, *extra]:
        for f in discover(folder)[0]:
            if f.stem not in trained and f.stem not in seen:
                seen.add(f.stem)
                tiles.append(read_tile(f, folder))
    return tiles


def refine(model: torch.nn.Module, cond: Conditioner, arr: np.ndarray, tile) -> np.ndarray:
    month, biome, _ = cond.resolve(tile.month, tile.biome, tile.defaults)
    with torch.inference_mode():
        return model(torch.from_numpy(arr)[None], torch.tensor([month]), torch.tensor([biome]))[0].numpy()


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def score(pt: Path, tiles: list, seeds: list[int]) -> dict:
    """Degraded: ratio per (tile, seed), pooled RMSE; clean: change of whole tiles and 64 px crops."""
    model = stage2.load_model(pt).eval()
    cond = Conditioner.of(model.conditioning)
    params = load_config("translator")
    per_sample, sse_in, sse_out, n = {}, 0.0, 0.0, 0
    for seed in seeds:
        for t in tiles:
            v1 = degrade(t.array, tile_seed(seed, t.name), params)
            v2 = refine(model, cond, v1, t)
            r_in, r_out = _rmse(t.array, v1), _rmse(t.array, v2)
            per_sample[f"{t.name}@{seed}"] = r_out / r_in
            sse_in += r_in ** 2 * t.array.size
            sse_out += r_out ** 2 * t.array.size
            n += t.array.size
    clean = {}
    for t in tiles:
        clean[t.name] = _rmse(t.array, refine(model, cond, t.array, t))
        h, w = t.array.shape[1:]
        y, x = (h - CROP) // 2, (w - CROP) // 2
        crop = np.ascontiguousarray(t.array[:, y:y + CROP, x:x + CROP])
        clean[f"{t.name}[64px]"] = _rmse(crop, refine(model, cond, crop, t))
    recoloured = {}
    for t in tiles:
        for label, gain in RECOLOUR.items():
            x = np.clip(t.array * np.asarray(gain, np.float32)[:, None, None], 0, 1)
            recoloured[f"{t.name}[{label}]"] = _rmse(x, refine(model, cond, x, t))
    r = np.array(list(per_sample.values()))
    worst_clean = max(clean, key=clean.get)
    return {"tiles": len(tiles), "samples": len(r), "median": float(np.median(r)), "worst": float(r.max()),
            "worst_tile": max(per_sample, key=per_sample.get), "ratios": per_sample,
            "worse": int((r > WORSE).sum()), "pooled_in": (sse_in / n) ** 0.5,
            "pooled_out": (sse_out / n) ** 0.5,
            "clean_mean": float(np.mean([clean[t.name] for t in tiles])), "clean_worst": clean[worst_clean],
            "clean_worst_tile": worst_clean, "clean": clean,
            "recoloured_mean": float(np.mean(list(recoloured.values()))),
            "recoloured_worst": max(recoloured.values()), "recoloured_worst_tile": max(recoloured, key=recoloured.get),
            "recoloured": recoloured}


def timing(out: Path, name: str) -> dict:
    s = json.loads((out / name / "train" / "train_summary.json").read_text())
    return {"steps": s["steps"], "wall_s": s["wall_s"], "steps_per_s": s["steps"] / max(s["wall_s"], 1e-9)}


def row(name: str, overrides: list[str], s: dict, t: dict) -> str:
    return (f"| {name} | `{' '.join(overrides) or '(the demo before)'}` | {t['steps']} | {s['median']:.3f} | "
            f"{s['worst']:.3f} | {s['worse']}/{s['samples']} | {s['pooled_in']:.4f} -> {s['pooled_out']:.4f} | "
            f"{s['clean_mean']:.4f} | {s['clean_worst']:.4f} | {s['recoloured_worst']:.4f} |")


HEAD = ("| recipe | overrides | steps | median ratio | worst ratio | worse > 2 % | pooled RMSE | clean moved, mean | "
        "clean moved, worst | recoloured clean moved, worst |\n|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "recipe")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2024, 2025, 2026])
    ap.add_argument("--extra-test-dir", type=Path, action="append", default=[])
    ap.add_argument("--leave-out", default=None)
    args = ap.parse_args()
    results_path = args.out / "recipe.json"
    args.out.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    optical_dir = training_dir(args.out, args.leave_out)
    rows = []
    for text in args.recipes:
        name, overrides = parse_recipe(text)
        if not overrides and name in results:      # a recipe trained before, by its name
            overrides = results[name]["overrides"]
        pt = train(name, overrides, args.out, optical_dir)
        tiles = test_tiles(args.out, name, args.extra_test_dir, optical_dir)
        s, t = score(pt, tiles, args.seeds), timing(args.out, name)
        results[name] = {"overrides": overrides, "score": s, "timing": t, "leave_out": args.leave_out}
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        rows.append(row(name, overrides, s, t))
        print(rows[-1], f"({t['steps_per_s']:.2f} steps/s; worst {s['worst_tile']}, clean worst "
              f"{s['clean_worst_tile']})", flush=True)
    print(HEAD)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
