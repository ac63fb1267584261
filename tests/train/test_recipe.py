"""The demo's recipe does no harm: a tiny refiner trained by it (`recipe=no_harm`, conf/recipe/, on a
short budget) leaves clean tiles of a source it never trained on within the no-harm bound
(docs/training.md#recipe): less than 0.002 RMSE on average and 0.01 at worst, whole and as 64 px crops,
and still corrects a tile under the product's degradation."""

from __future__ import annotations

import shutil

import numpy as np
import torch

import stage2
from helpers import REPO, compose_app
from stage2.conditioning import Conditioner
from stage2.tiles import discover, read_tile
from stage2.train.degrade import degrade as degrade_tile
from stage2.train.degrade import load_config, tile_seed

UNSEEN = "ben"      # BigEarthNet patches: European fields and forests, as EuroSAT's


def _refine(model, cond: Conditioner, arr: np.ndarray, tile) -> np.ndarray:
    month, biome, _ = cond.resolve(tile.month, tile.biome, tile.defaults)
    with torch.inference_mode():
        return model(torch.from_numpy(arr)[None], torch.tensor([month]), torch.tensor([biome]))[0].numpy()


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def test_the_recipe_leaves_clean_tiles_of_an_unseen_source_alone(tmp_path):
    from stage2.train.app import run as train

    opt = tmp_path / "opt"
    opt.mkdir()
    for f in (REPO / "examples" / "train_optical").iterdir():
        if f.suffix in (".npz", ".json") and not f.name.startswith(UNSEEN):
            shutil.copy(f, opt / f.name)
    # the recipe as the demo runs it, on a short budget: 48 steps of 8 crops of 64 px
    cfg = compose_app("train", ["hardware=cpu", "precision=32", "recipe=no_harm", "data.batch_size=8",
                                "data.samples_per_epoch=128", "data.val_fraction=0", "trainer.max_epochs=3",
                                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
                      tmp_path / "run", optical_dir=opt)
    assert cfg.data.clean_every > 0 and cfg.loss.clean_weight > 0 and list(cfg.degrade.only) == ["translator"]
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        assert train(cfg) == 0
    finally:                  # a run switches torch to deterministic algorithms (trainer.deterministic)
        torch.use_deterministic_algorithms(deterministic)
    model = stage2.load_model(tmp_path / "run" / "stage2_refiner.pt")
    cond = Conditioner.of(model.conditioning)

    demo = REPO / "examples" / "demo_aoi"
    tiles = [read_tile(f, demo) for f in discover(demo)[0] if f.stem.startswith(UNSEEN)]
    assert len(tiles) == 3
    moved = []
    for t in tiles:
        moved.append(_rmse(_refine(model, cond, t.array, t), t.array))
        crop = np.ascontiguousarray(t.array[:, 28:92, 28:92])
        moved.append(_rmse(_refine(model, cond, crop, t), crop))
    assert np.mean(moved[::2]) < 0.002 and max(moved) < 0.01, moved
    # ... and it is no identity: a tile under the product's degradation does change
    v1 = degrade_tile(tiles[0].array, tile_seed(2024, tiles[0].name), load_config("translator"))
    assert _rmse(_refine(model, cond, v1, tiles[0]), v1) > 1e-3
