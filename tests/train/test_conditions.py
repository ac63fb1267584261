"""Known conditions and honest figures in training: the learned "unknown" month and biome, the
checkpoint's record of what it was trained on, the clean-correction penalty and the spread of the
validation figures (SPEC 6)."""

from __future__ import annotations

import copy
import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import stage2
from helpers import make_tile
from stage2.checkpoint import CheckpointError, load_model
from stage2.train.app import build_data
from stage2.train.data import RandomCropPairs, scan
from stage2.train.degrade import load_config
from stage2.train.scores import tile_errors, validation_scores


def _old_format(model: torch.nn.Module, path) -> None:
    """`model` written as checkpoints were before the unknown month: 12 month rows, no conditioning record."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["month_embed.weight"] = state["month_embed.weight"][1:]
    torch.save({"stage2_checkpoint": 1, "stage2_version": "0.1.0", "model_config": dict(model.config),
                "state_dict": state}, path)


def test_checkpoints_without_the_unknown_month_load_and_give_the_same_outputs(tiny_model, tmp_path):
    # the rows of months 1-12 as an older stage2 stored them (row m-1 for month m), with distinct values
    tiny_model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        tiny_model.month_embed.weight[0].zero_()
    _old_format(tiny_model, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    assert old.conditioning is None
    assert old.month_embed.weight.shape[0] == 13 and torch.count_nonzero(old.month_embed.weight[0]) == 0
    x = torch.rand(3, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for month in range(1, 13):
            m = torch.full((3,), month)
            assert torch.equal(old(x, m, torch.tensor([0, 3, 7])), tiny_model(x, m, torch.tensor([0, 3, 7])))
    # re-saved, it is in the current format and still the same model
    stage2.save_checkpoint(old, tmp_path / "resaved.pt")
    assert torch.load(tmp_path / "resaved.pt", weights_only=True)["state_dict"]["month_embed.weight"].shape[0] == 13


def test_the_conditioning_record_travels_with_the_checkpoint_and_a_damaged_one_is_refused(tiny_model, tmp_path):
    from stage2.checkpoint import conditioning_record

    tiny_model = copy.deepcopy(tiny_model)
    tiny_model.conditioning = conditioning_record([3, 3, 7], [4, 0], month_dropout=0.2, biome_dropout=0.1)
    stage2.save_checkpoint(tiny_model, tmp_path / "a.pt")
    assert load_model(tmp_path / "a.pt").conditioning == {"months": [3, 7], "biomes": [0, 4],
                                                         "month_dropout": 0.2, "biome_dropout": 0.1}
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    raw["conditioning"] = {"months": [13], "biomes": [0]}
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="damaged 'conditioning' record"):
        load_model(tmp_path / "bad.pt")


def test_a_tile_without_a_month_trains_the_unknown_month_and_dropout_draws_only_the_condition(tmp_path):
    make_tile(tmp_path / "dated.npz", 64, 64, seed=1, meta={"month": 4, "biome_code": 5})
    make_tile(tmp_path / "undated.npz", 64, 64, seed=2, meta={"biome_code": 0})
    sources = scan(tmp_path, simulated=True)
    assert [(s.name, s.month, s.biome) for s in sources] == [("dated", 4, 5), ("undated", 0, 0)]
    params = load_config("family")
    plain = RandomCropPairs(sources, 32, 0, params)
    dropped = RandomCropPairs(sources, 32, 0, params, month_dropout=1.0, biome_dropout=1.0)
    half = RandomCropPairs(sources, 32, 0, params, month_dropout=0.5, biome_dropout=0.5)
    months = []
    for i in range(24):
        a, b, c = plain[i], dropped[i], half[i]
        assert torch.equal(a["opt_v1"], b["opt_v1"]) and torch.equal(a["target"], c["target"])   # same crop and errors
        assert b["month"] == 0 and b["biome"] == 0
        assert a["month"] == plain.source_at(i).month
        assert bool(a["clean"]) == torch.equal(a["opt_v1"], a["target"])
        months.append(int(c["month"]))
    assert 0 < months.count(0) < 24


def test_clean_twins_are_the_crop_before_them_without_its_errors_and_jitter_recolours_both_sides(tmp_path):
    make_tile(tmp_path / "a.npz", 80, 80, seed=1, meta={"month": 4, "biome_code": 5})
    sources = scan(tmp_path, simulated=True)
    params = load_config("family").restricted(only=("translator",), clean_fraction=0)
    plain = RandomCropPairs(sources, 32, 0, params)
    twins = RandomCropPairs(sources, 32, 0, params, clean_every=3, month_dropout=0.5)
    jittered = RandomCropPairs(sources, 32, 0, params, colour_jitter=0.2)
    for i in range(9):
        item = twins[i]
        if i % 3 == 2:           # the clean twin of sample i - 1: same truth crop and conditions, no errors
            before = twins[i - 1]
            assert bool(item["clean"]) and torch.equal(item["opt_v1"], item["target"])
            assert torch.equal(item["target"], before["target"]) and item["month"] == before["month"]
        else:
            assert not item["clean"] and torch.equal(item["opt_v1"], plain[i]["opt_v1"])
        a, b = plain[i]["target"], jittered[i]["target"]
        assert not torch.equal(a, b) and float(b.min()) >= 0 and float(b.max()) <= 1
    with pytest.raises(ValueError, match="clean_every must be 0"):
        RandomCropPairs(sources, 32, 0, params, clean_every=1)


def test_the_spread_figures_pool_pixels_and_count_tiles_made_worse():
    truth = np.zeros((4, 10, 10))
    records = [
        {"clean": False, **tile_errors(truth, truth + 0.02, truth + 0.01)},     # x0.5
        {"clean": False, **tile_errors(truth, truth + 0.01, truth + 0.0105)},   # x1.05: worse by > 2 %
        {"clean": False, **tile_errors(truth, truth + 0.04, truth + 0.036)},    # x0.9
        {"clean": True, **tile_errors(truth, truth, truth + 0.003)},
        {"clean": True, **tile_errors(truth, truth, truth + 0.001)},
    ]
    s = validation_scores(records)
    assert s["val_ratio_median"] == pytest.approx(0.9) and s["val_ratio_worst"] == pytest.approx(1.05)
    assert s["val_tiles_worse"] == 1
    assert s["val_rmse_pooled_in"] == pytest.approx(np.sqrt((0.02 ** 2 + 0.01 ** 2 + 0.04 ** 2) / 3))
    assert s["val_clean_change_mean"] == pytest.approx(0.002) and s["val_clean_change_worst"] == pytest.approx(0.003)


def test_the_clean_penalty_counts_only_clean_samples(cfg_train):
    from omegaconf import OmegaConf

    from stage2.train.module import RefinerTrainModule

    loss = {**OmegaConf.to_container(cfg_train.loss), "clean_weight": 2.0}
    module = RefinerTrainModule(stage2.build_model("prithvi_eo_tiny"), loss=loss,
                                optim=OmegaConf.to_container(cfg_train.optim), pretrained_path=None)
    v1 = torch.zeros(4, 4, 8, 8)
    out = v1 + torch.tensor([0.1, 0.2, 0.3, 0.4]).view(4, 1, 1, 1)
    clean = torch.tensor([True, False, False, True])
    assert module.clean_penalty(out, v1, clean).item() == pytest.approx((0.1 + 0.4) / 4)
    module.loss_cfg["clean_scale"] = 0.2           # quadratic: c^2 / scale
    assert module.clean_penalty(out, v1, clean).item() == pytest.approx((0.01 + 0.16) / 0.2 / 4)
    # the weight rises linearly over the first clean_warmup share of the steps
    module.loss_cfg["clean_warmup"] = 0.5
    module._trainer = SimpleNamespace(estimated_stepping_batches=100, global_step=25)
    assert module.clean_weight_now() == pytest.approx(1.0)
    module._trainer.global_step = 80
    assert module.clean_weight_now() == pytest.approx(2.0)


def test_training_records_its_conditions_and_reports_the_spread(tmp_path, cfg_train, capsys):
    from stage2.train.app import run as train

    opt = tmp_path / "opt"
    for i, meta in enumerate([{"month": 3, "biome_code": 4}, {"month": 8, "biome_code": 4},
                              {"month": 5, "biome_code": 9}, {"biome_code": 0}]):
        make_tile(opt / f"t{i}.npz", 48, 48, seed=i, meta=meta)
    cfg_train.optical_dir, cfg_train.data.val_fraction = str(opt), 0.25
    cfg_train.data.month_dropout, cfg_train.data.biome_dropout, cfg_train.loss.clean_weight = 0.3, 0.2, 1.0
    dm = build_data(cfg_train)
    assert [s.name for s in dm.val_sources] == ["t2"]          # the seeded choice: t2 is held out
    assert train(cfg_train) == 0
    out = capsys.readouterr().out
    assert "per tile median x" in out and "worse by > 2 %; pooled RMSE" in out and "clean held-out tiles moved" in out
    run = tmp_path / "run"
    expected = {"months": [3, 8], "biomes": [0, 4], "month_dropout": 0.3, "biome_dropout": 0.2}
    assert load_model(run / "stage2_refiner.pt").conditioning == expected
    best = next(p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    assert load_model(best).conditioning == expected
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["conditioning"] == expected
    assert {"val_ratio_median", "val_ratio_worst", "val_tiles_worse", "val_rmse_pooled_out",
            "val_clean_change_worst"} <= set(summary["best_validation"])
    rows = [r for r in csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()) if r.get("val_loss")]
    assert rows and all(r["val_ratio_median"] and r["val_clean_change_mean"] for r in rows)
    assert all(float(r["train_clean_change"]) >= 0 for r in csv.DictReader(
        (run / "csv" / "version_0" / "metrics.csv").open()) if r.get("train_clean_change"))


def test_a_ckpt_from_before_the_unknown_month_resumes_with_its_adam_moments_padded():
    from stage2.train.module import param_groups, with_unknown_month_moments

    model = stage2.build_model("prithvi_eo_tiny")
    decay, no_decay = param_groups(model)
    index = [id(p) for p in (*decay, *no_decay)].index(id(model.month_embed.weight))
    dim = model.month_embed.embedding_dim
    moments = {"step": torch.tensor(5.0), "exp_avg": torch.ones(12, dim), "exp_avg_sq": torch.full((12, dim), 2.0)}
    ckpt = {"state_dict": {"model.month_embed.weight": torch.ones(12, dim)},
            "optimizer_states": [{"state": {index: moments}, "param_groups": []}]}
    with_unknown_month_moments(ckpt, model)
    state = ckpt["optimizer_states"][0]["state"][index]
    assert state["exp_avg"].shape == (13, dim) and torch.count_nonzero(state["exp_avg"][0]) == 0
    assert torch.equal(state["exp_avg_sq"][1:], torch.full((12, dim), 2.0)) and state["step"].item() == 5.0
