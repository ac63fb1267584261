"""The error family (stage2.train.family), real_weight mixing and the no-harm promise (issue 17)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import REPO, compose_app, make_tile
from stage2.train.degrade import DegradeParams, degrade, load_config, load_params
from stage2.train.family import KINDS, FamilyParams, draw_kinds

F = load_config("family")            # conf/degradation/family.yaml


def _real(name: str = "ben1_20170617_4_55") -> np.ndarray:
    return np.load(REPO / "examples" / "demo_aoi" / f"{name}.npz")["opt_v1"][:, :96, :96]


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def test_every_kind_is_documented_changes_the_tile_and_stays_valid():
    x = _real()
    assert len(KINDS) >= 10
    for name, fn in KINDS.items():
        assert fn.__doc__ and len(fn.__doc__.strip()) > 30, name      # why it is there
        y = degrade(x, 3, F.restricted(only=(name,), clean_fraction=0))
        assert y.dtype == np.float32 and y.shape == x.shape, name
        assert np.isfinite(y).all() and 0 <= y.min() and y.max() <= 1, name
        assert _rmse(y, x) > 5e-4, name


def test_family_is_deterministic_per_seed_and_has_clean_samples():
    x = _real()
    a, b, c = degrade(x, 7, F), degrade(x, 7, F), degrade(x, 8, F)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    drawn = [draw_kinds(np.random.default_rng(s), F) for s in range(2000)]
    clean = sum(not d for d in drawn) / len(drawn)
    assert abs(clean - F.clean_fraction) < 0.03
    assert {k for d in drawn for k in d} == {k for k in KINDS if F.kinds[k]["p"] > 0}   # every kind with a p
    assert len({tuple(d) for d in drawn}) > 50                 # kinds are drawn per sample
    # a clean sample is the input itself
    s = next(i for i, d in enumerate(drawn) if not d)
    assert np.array_equal(degrade(x, np.random.default_rng(s), F), x)


def test_exclude_leaves_kinds_out_without_moving_the_other_draws():
    held = ("haze", "blur")
    ex = F.restricted(exclude=held)
    x = _real()
    for s in range(300):
        full, without = draw_kinds(np.random.default_rng(s), F), draw_kinds(np.random.default_rng(s), ex)
        assert not set(without) & set(held)
        if set(full) - set(held) and full:
            assert without == [k for k in full if k not in held]
            if not set(full) & set(held):          # the same kinds: the same tile
                assert np.array_equal(degrade(x, s, F), degrade(x, s, ex))


def test_the_translator_kind_is_the_products_own_recipe():
    """family.yaml's `translator` kind holds conf/degradation/translator.yaml's values (so the demo, which
    draws it, trains on the degradation `stage2.degrade` makes)."""
    from dataclasses import asdict

    t = load_config("translator")
    kind = {k: tuple(v) if isinstance(v, list) else v for k, v in F.kinds["translator"].items() if k != "p"}
    assert kind == asdict(t)
    x = _real()
    y = degrade(x, 4, F.restricted(only=("translator",), clean_fraction=0))
    assert 0.01 < _rmse(y, x) < 0.05


def test_family_settings_are_checked():
    with pytest.raises(ValueError, match=r"unknown \['fog'\]"):
        load_params({**_mapping(), "exclude": ["fog"]})
    with pytest.raises(ValueError, match="leave no kind"):
        load_params({**_mapping(), "exclude": list(KINDS)})
    with pytest.raises(ValueError, match="recipe 'mixed' is unknown"):
        load_params({"recipe": "mixed"})
    assert isinstance(load_params(_mapping()), FamilyParams)
    assert isinstance(load_config("translator"), DegradeParams)


def _mapping() -> dict:
    from omegaconf import OmegaConf

    from stage2 import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "degradation" / "family.yaml"))


def test_degrade_cli_runs_one_kind_of_the_family(tmp_path, capsys):
    from stage2.train.degrade import run

    truth = tmp_path / "truth"
    x = make_tile(truth / "a.npz", 48, 48, seed=1)
    overrides = ["degradation@degrade=family", "degrade.only=[haze]", "degrade.clean_fraction=0"]
    cfg = compose_app("degrade", overrides, truth_dir=truth, output_dir=tmp_path / "s1", seed=5)
    assert run(cfg) == 0
    assert capsys.readouterr().out.strip() == (f"degraded 1 tiles from {truth} into {tmp_path / 's1'} "
                                               "(seed 5, family kinds haze)")
    y = np.load(tmp_path / "s1" / "a.npz")["opt_v1"]
    assert _rmse(y, x) > 1e-3
    # haze adds a smooth layer: the blue band gains more than NIR, and no pixel gets darker
    assert (y[0] - x[0]).mean() > (y[3] - x[3]).mean() and (y >= x - 1e-6).all()
    meta = json.loads((tmp_path / "s1" / "_degradation.json").read_text())
    assert meta["recipe"] == "family" and meta["params"]["only"] == ["haze"]


# ----------------------------------------------------------------------------- real_weight
def test_real_weight_sets_the_share_of_real_crops(tmp_path):
    from stage2.runtime import RunError
    from stage2.train.app import build_data
    from stage2.train.data import RandomCropPairs

    opt, pairs = tmp_path / "opt", tmp_path / "pairs"
    for i in range(3):
        make_tile(opt / f"t{i}.npz", 96, 96, seed=i)          # 3 simulated tiles, 3x the area of the real one
    target = make_tile(pairs / "p0.npz", 96, 96, seed=9)
    np.savez(pairs / "p0.npz", opt_v1=degrade(target, 0, F), target=target)
    cfg = compose_app("train", ["hardware=cpu", "degradation@degrade=family", "data.crop=32", "data.val_fraction=0"],
                      tmp_path / "run", optical_dir=opt, pairs_dir=pairs)
    for weight, share in ((None, 0.25), (0.8, 0.8), (0.0, 0.0), (1.0, 1.0)):
        cfg.data.real_weight = weight
        ds = build_data(cfg).train_dataloader().dataset
        assert isinstance(ds, RandomCropPairs)
        real = np.mean([not ds.source_at(i).simulated for i in range(2000)])
        assert abs(real - share) < 0.03, (weight, real)
        item = ds[0]                                           # crops still come out as before
        assert item["opt_v1"].shape == (4, 32, 32)
    cfg.data.real_weight = 1.5
    with pytest.raises(RunError, match=r"data.real_weight must be in \[0, 1\].*got 1.5"):
        build_data(cfg)


# ----------------------------------------------------------------------------- no harm
def test_a_family_trained_refiner_leaves_clean_real_tiles_alone(tmp_path):
    """Train a tiny refiner briefly on the family (real optical of examples/train_optical, half the
    samples clean), then refine clean real tiles it never saw: the RMSE to the truth (= the input)
    changes by less than 0.005, and by less than before training."""
    import torch

    import stage2
    from stage2.tiles import discover, read_tile
    from stage2.train.app import run as train

    cfg = compose_app("train", ["hardware=cpu", "precision=32", "degradation@degrade=family",
                                "degrade.clean_fraction=0.5", "data.crop=32", "data.batch_size=8",
                                "data.samples_per_epoch=480", "data.val_fraction=0", "optim.warmup_steps=5",
                                "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                                "trainer.enable_model_summary=false"], tmp_path / "run",
                      optical_dir=REPO / "examples" / "train_optical", output_checkpoint=tmp_path / "r.pt")
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        assert train(cfg) == 0
    finally:
        torch.use_deterministic_algorithms(deterministic)
    torch.manual_seed(int(cfg.seed))                  # the app's start: the same initial weights
    start = stage2.build_model("prithvi_eo_tiny").eval()
    model = stage2.load_model(tmp_path / "r.pt").eval()
    for f in discover(REPO / "examples" / "demo_aoi")[0]:
        t = read_tile(f, f.parent)
        x, m, b = torch.from_numpy(t.array)[None], torch.tensor([t.month]), torch.tensor([t.biome])
        with torch.inference_mode():
            before, after = _rmse(start(x, m, b)[0].numpy(), t.array), _rmse(model(x, m, b)[0].numpy(), t.array)
        print(f"{f.stem}: clean change {before:.4f} untrained -> {after:.4f} trained")
        assert after < 0.005 and after < before, f.name
