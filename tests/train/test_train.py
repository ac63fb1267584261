"""Training the refiner (stage2.train: app, data, module, degrade, pretrained): behaviour a user relies on.

In this process through the composed conf/train.yaml (`cfg_train`) and degrade.yaml; each command
once as a user types it (`python -m stage2.train | degrade`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import stage2
from helpers import compose_app, make_tile, read_opt_v2, run_cli
from stage2.tiles import read_tile
from stage2.train.app import build_data
from stage2.train.degrade import DegradeParams, degrade, degrade_dir

P = DegradeParams.from_config()      # conf/degradation/translator.yaml, as stage2.train uses it


def train_module(model, cfg):
    """RefinerTrainModule with `cfg`'s (conf/train.yaml's) loss and optimiser settings, as the app builds it."""
    from omegaconf import OmegaConf

    from stage2.train.module import RefinerTrainModule

    return RefinerTrainModule(model, loss=OmegaConf.to_container(cfg.loss), optim=OmegaConf.to_container(cfg.optim),
                              pretrained_path=None)


def _truth(seed: int = 0, h: int = 64, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.uniform(0, 1, (4, h, w)).astype(np.float32)
    arr[:, :8] = 0.0          # values at both ends of the range must stay in range
    arr[:, -8:] = 1.0
    return arr


# ----------------------------------------------------------------------------- degradation
def test_degradation_is_deterministic_per_seed_and_stays_in_range():
    x = _truth()
    a, b, c = degrade(x, 7, P), degrade(x, 7, P), degrade(x, 8, P)
    assert a.dtype == np.float32 and a.shape == x.shape
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    for y in (a, c):
        assert np.isfinite(y).all() and y.min() >= 0.0 and y.max() <= 1.0
        assert np.sqrt(np.mean((y - x) ** 2)) > 0.01        # it really degrades
    # each component alone also changes the tile and keeps it valid
    zero = DegradeParams(max_shift=0, blur_sigma=(0, 0), contrast=(1, 1), anchor=P.anchor, gain_sd=0, offset_sd=0,
                         speckle_sd=(0, 0), noise_sd=(0, 0))
    assert np.allclose(degrade(x, 1, zero), x, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(4, H, W\)"):
        degrade(x[:3], 0, P)
    with pytest.raises(ValueError, match="unknown"):
        DegradeParams.from_mapping({"blur": 1})


def test_degrade_cli_writes_stage1_tiles_seeded_by_name(tmp_path, capsys):
    """Includes the smoke test of `python -m stage2.degrade` (one subprocess); the errors run in this process."""
    from stage2.train.degrade import run

    truth = tmp_path / "truth"
    make_tile(truth / "a.npz", 40, 48, seed=1, meta={"month": 7, "biome_code": 4, "tile_id": "a"})
    make_tile(truth / "b.npz", 32, 32, seed=2)
    r = run_cli([f"truth_dir={truth}", f"output_dir={tmp_path / 's1'}", "seed=3"], module="stage2.degrade")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"degraded 2 tiles from {truth} into {tmp_path / 's1'} (seed 3)"]
    t = read_tile(tmp_path / "s1" / "a.npz")                 # predict's own reader accepts it
    assert t.array.shape == (4, 40, 48) and (t.month, t.biome, t.meta["tile_id"]) == (7, 4, "a")
    # a tile's degradation depends on (seed, name) only, not on the other tiles in the folder
    alone = tmp_path / "alone"
    make_tile(alone / "a.npz", 40, 48, seed=1)
    degrade_dir(alone, tmp_path / "s1_alone", seed=3, params=P)
    assert np.array_equal(np.load(tmp_path / "s1_alone" / "a.npz")["opt_v1"], t.array)
    assert run(compose_app("degrade", [], truth_dir=tmp_path / "none", output_dir=tmp_path / "x")) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"stage2.degrade: error: truth_dir {tmp_path / 'none'} does not exist")
    (tmp_path / "empty").mkdir()
    assert run(compose_app("degrade", [], truth_dir=tmp_path / "empty", output_dir=tmp_path / "x")) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"stage2.degrade: error: No NPZ tiles found in {tmp_path / 'empty'}"]
    assert run(compose_app("degrade", ["+degrade.blur=1"], truth_dir=truth, output_dir=tmp_path / "x")) == 2
    assert "degradation keys: unknown ['blur']" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- data
def _pairs_dir(path: Path, n: int = 2, size: int = 48) -> Path:
    for i in range(n):
        target = make_tile(path / f"p{i}.npz", size, size, seed=10 + i, meta={"month": 5, "biome_code": 8})
        np.savez(path / f"p{i}.npz", opt_v1=degrade(target, i, P), target=target)
    return path


def test_pair_data_is_reproducible_and_checks_files(tmp_path, cfg_train):
    from stage2.train.data import PairError, RandomCropPairs, read_pair, scan

    opt = tmp_path / "opt"
    for i in range(3):
        make_tile(opt / f"t{i}.npz", 40 + 8 * i, 64, seed=i)
    sources = scan(opt, simulated=True) + scan(_pairs_dir(tmp_path / "pairs"), simulated=False)
    ds = RandomCropPairs(sources, crop=32, seed=0, params=P)
    for i in (0, 5, 17):
        a, b = ds[i], ds[i]
        assert a["opt_v1"].shape == a["target"].shape == (4, 32, 32)
        assert torch.equal(a["opt_v1"], b["opt_v1"]) and torch.equal(a["target"], b["target"])
        assert 0 <= float(a["opt_v1"].min()) and float(a["opt_v1"].max()) <= 1
    assert not torch.equal(ds[0]["target"], ds[1]["target"])

    cfg_train.optical_dir, cfg_train.pairs_dir, cfg_train.data.val_fraction = str(opt), str(tmp_path / "pairs"), 0.3
    dm = build_data(cfg_train)      # crops of 32 px, batches of 4, 8 crops an epoch
    assert len(dm.train_sources) == 3 and len(dm.val_sources) == 2          # one held-out tile per source
    assert not {s.name for s in dm.train_sources} & {s.name for s in dm.val_sources}
    assert len(dm.train_dataloader()) == 2

    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "x.npz", opt_v1=np.zeros((4, 32, 32), np.float32))
    with pytest.raises(PairError, match=r"x\.npz: no 'target' array"):
        read_pair(bad / "x.npz")
    np.savez(bad / "x.npz", opt_v1=np.zeros((4, 32, 32), np.float32), target=np.zeros((4, 32, 30), np.float32))
    with pytest.raises(PairError, match="differ in shape"):
        read_pair(bad / "x.npz")
    np.savez(bad / "x.npz", opt_v1=np.zeros((4, 32, 32), np.float32), target=np.full((4, 32, 32), 900.0, np.float32))
    with pytest.raises(PairError, match=r"'target' values in .* far outside"):
        read_pair(bad / "x.npz")


# ----------------------------------------------------------------------------- learning
def test_a_few_training_steps_reduce_the_loss_on_a_fixed_batch(cfg_train):
    torch.manual_seed(0)
    module = train_module(stage2.build_model("prithvi_eo_tiny").train(), cfg_train)
    target = torch.from_numpy(np.stack([_truth(s, 32, 32) * 0.5 + 0.2 for s in range(4)]))
    v1 = torch.from_numpy(np.stack([degrade(t.numpy(), s, P) for s, t in enumerate(target)]))
    month, biome = torch.full((4,), 6), torch.zeros(4, dtype=torch.long)
    opt = torch.optim.AdamW(module.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss, _, _ = module.compute_loss(module(v1, month, biome), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_freeze_encoder_keeps_it_fixed_for_the_first_epochs(tmp_path, cfg_train):
    import lightning as L

    from stage2.train.module import FreezeEncoder

    opt = tmp_path / "opt"
    for i in range(2):
        make_tile(opt / f"t{i}.npz", 48, 48, seed=i)
    L.seed_everything(0)
    module = train_module(stage2.build_model("prithvi_eo_tiny").train(), cfg_train)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    cfg_train.optical_dir = str(opt)
    cfg_train.data.batch_size, cfg_train.data.samples_per_epoch, cfg_train.data.val_fraction = 2, 6, 0
    dm = build_data(cfg_train)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[FreezeEncoder(1)])
    trainer.fit(module, datamodule=dm)
    after = module.model.state_dict()
    assert trainer.global_step == 3
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not torch.equal(before["refine.2.weight"], after["refine.2.weight"])
    # from epoch 1 on the encoder trains
    FreezeEncoder(1).on_train_epoch_start(SimpleNamespace(current_epoch=1), module)
    assert all(p.requires_grad for p in module.model.encoder.parameters())


def test_with_ema_decay_the_exported_refiner_is_the_average_of_the_steps(tmp_path, cfg_train):
    """ema_decay > 0: the .pt holds the exponential moving average of the weights, not the last step's."""
    from stage2.train.app import run as train

    for i in range(2):
        make_tile(tmp_path / "opt" / f"t{i}.npz", 48, 48, seed=i)
    cfg_train.optical_dir, cfg_train.data.val_fraction, cfg_train.ema_decay = str(tmp_path / "opt"), 0.0, 0.5
    assert train(cfg_train) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    exported = stage2.load_model(tmp_path / "run" / "stage2_refiner.pt").state_dict()
    key = "refine.2.weight"
    assert torch.equal(exported[key], ckpt["state_dict"]["model." + key])
    assert not torch.equal(exported[key], ckpt["current_model_state"]["model." + key])
    cfg_train.ema_decay = 1.0
    assert train(cfg_train) == 2


# ----------------------------------------------------------------------------- the CLI, end to end
def test_training_writes_checkpoints_that_load_and_predict(tmp_path, cfg_train, tiny_ckpt, capsys):
    """stage2.train's app over the composed conf/train.yaml, in this process; then predict reads its checkpoint."""
    from stage2.predict.app import run as predict
    from stage2.train.app import run as train

    opt = tmp_path / "opt"
    for i in range(3):
        make_tile(opt / f"t{i}.npz", 48, 64, seed=i, meta={"month": 3 + i, "biome_code": i})
    pairs = _pairs_dir(tmp_path / "pairs")
    run = tmp_path / "run"                      # cfg_train's run dir (Hydra's hydra.run.dir)
    cfg_train.optical_dir, cfg_train.pairs_dir, cfg_train.data.val_fraction = str(opt), str(pairs), 0.3
    assert train(cfg_train) == 0
    printed = capsys.readouterr().out
    assert "validation (2 held-out tiles, best epoch): RMSE(output)/RMSE(input) per tile median x" in printed
    assert "means over tiles: RMSE" in printed

    pt = run / "stage2_refiner.pt"
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    best = [c for c in ckpts if c.name != "last.ckpt"]
    assert pt.is_file() and len(best) == 1 and (run / "checkpoints" / "last.ckpt").is_file()
    raw = torch.load(best[0], map_location="cpu", weights_only=True)     # plain types only
    assert raw["hyper_parameters"]["stage2_checkpoint"] == 1
    assert raw["hyper_parameters"]["model_config"]["backbone"] == "prithvi_eo_tiny"
    m_pt, m_ckpt = stage2.load_model(pt), stage2.load_model(best[0])
    assert all(torch.equal(a, b) for a, b in zip(m_pt.state_dict().values(), m_ckpt.state_dict().values(), strict=True))
    untrained = stage2.build_model("prithvi_eo_tiny")
    assert not torch.equal(m_pt.state_dict()["refine.2.weight"], untrained.state_dict()["refine.2.weight"])

    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    val = [row for row in rows if row.get("val_loss")]
    assert len(val) == 2
    last = {k: float(v) for k, v in val[-1].items() if k.startswith("val_")}
    assert all(math.isfinite(v) for v in last.values()), last
    for side in ("in", "out"):      # plausible values, not only numbers
        assert 0 < last[f"val_rmse_{side}"] < 1 and 0 < last[f"val_ndvi_rmse_{side}"] <= 2
        assert last[f"val_psnr_{side}"] > 0 and -1 <= last[f"val_edge_preservation_{side}"] <= 1
    assert last["val_rmse_in"] > 0.01                   # the validation inputs really are degraded
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["val_tiles"]) == 2
    best_epoch = min(val, key=lambda row: float(row["val_loss"]))
    assert summary["best_validation"]["val_rmse_out"] == pytest.approx(float(best_epoch["val_rmse_out"]))

    # predict reads the Lightning checkpoint as it is
    inp = tmp_path / "in"
    make_tile(inp / "x.npz", 40, 40, seed=9)
    out = tmp_path / "out"
    cfg = compose_app("predict", ["hardware=cpu", "precision=32"], tmp_path / "predict_run", checkpoint=best[0],
                      input_dir=inp, output_dir=out)
    assert predict(cfg) == 0
    v2 = read_opt_v2(out / "x.npz")
    with torch.inference_mode():
        expect = m_ckpt(torch.from_numpy(read_tile(inp / "x.npz").array)[None], torch.tensor([6]), torch.tensor([0]))
    assert np.abs(expect[0].numpy() - v2).max() <= 1e-5


def test_train_cli_says_what_is_wrong_with_its_inputs(tmp_path, cfg_train, capsys):
    """Includes the smoke test of `python -m stage2.train` (one subprocess); the rest in this process."""
    from stage2.train.app import run

    r = run_cli(["hardware=cpu", f"hydra.run.dir={tmp_path / 'cli_run'}"], cwd=tmp_path, module="stage2.train")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "stage2: error: no training data" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "t.npz", opt_v1=np.full((4, 32, 32), 812.0, np.float32))
    for key, folder, words in (("optical_dir", tmp_path / "nope", ["nope", "does not exist"]),
                               ("optical_dir", bad, ["t.npz", "far outside [0, 1]", "divide by 10000"]),
                               ("pairs_dir", bad, ["t.npz", "no 'target' array"])):
        cfg = cfg_train.copy()
        cfg[key] = str(folder)
        assert run(cfg) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("stage2: error: ") and all(w in line for w in words), line


# ----------------------------------------------------------------------------- pretrained Prithvi weights
@pytest.fixture(scope="module")
def prithvi_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A file laid out like Prithvi's original checkpoint: a 6-band PrithviMAE state dict, torch.save'd."""
    from terratorch.models.backbones.prithvi_vit import PRETRAINED_BANDS, _create_prithvi

    torch.manual_seed(123)
    mae = _create_prithvi("prithvi_eo_tiny", pretrained=False, encoder_only=False, model_bands=PRETRAINED_BANDS)
    state = {k: v.detach().clone() for k, v in mae.state_dict().items()}
    assert state["encoder.patch_embed.proj.weight"].shape[1] == 6 and any(k.startswith("decoder.") for k in state)
    path = tmp_path_factory.mktemp("prithvi") / "Prithvi_EO_tiny.pt"
    torch.save(state, path)
    return path, state


def test_pretrained_weights_load_into_the_encoder_for_our_four_bands(prithvi_file, tmp_path):
    from stage2.train.pretrained import PretrainedError, load_pretrained_encoder

    path, state = prithvi_file
    model = stage2.build_model("prithvi_eo_tiny")
    report = load_pretrained_encoder(model, path)
    enc = model.encoder.state_dict()
    # bands BLUE, GREEN, RED, NIR_NARROW are the first four of Prithvi's six
    assert torch.equal(enc["patch_embed.proj.weight"], state["encoder.patch_embed.proj.weight"][:, :4])
    for key in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "norm.weight", "cls_token"):
        assert torch.equal(enc[key], state[f"encoder.{key}"]), key
    assert "patch_embed.proj.weight" in report["loaded"] and not report["missing"]

    bad = tmp_path / "other.pt"
    torch.save({"backbone.conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(PretrainedError, match=r"other\.pt"):
        load_pretrained_encoder(model, bad)
    with pytest.raises(PretrainedError, match="does not exist"):
        load_pretrained_encoder(model, tmp_path / "missing.pt")


def test_train_config_starts_from_pretrained_path(prithvi_file):
    from hydra import compose, initialize_config_dir

    from stage2.model import CONF_DIR
    from stage2.train.app import build_model

    path, state = prithvi_file
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hardware=cpu", f"model.pretrained_path={path}"])
    model = build_model(cfg)
    assert torch.equal(model.encoder.state_dict()["blocks.1.attn.proj.weight"],
                       state["encoder.blocks.1.attn.proj.weight"])


# ----------------------------------------------------------------------------- resuming
def test_resume_from_must_be_a_local_stage2_checkpoint(tmp_path, capsys):
    from stage2.train.app import run

    opt = tmp_path / "opt"
    make_tile(opt / "t0.npz", 48, 48)
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    for value, words in ((tmp_path / "missing.ckpt", "does not exist"),
                         ("https://example.com/last.ckpt", "is a URL"),
                         ("s3://bucket/last.ckpt", "is a URL"),
                         (tmp_path / "notes.ckpt", "not a safe Stage 2 checkpoint")):
        assert run(compose_app("train", ["hardware=cpu", f"optical_dir={opt}", f"resume_from={value}"])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "resume_from" in err[0] and words in err[0] and "Traceback" not in err[0], err


def test_after_a_resume_the_exported_pt_is_the_best_over_both_runs(tmp_path, monkeypatch):
    """The resumed run validates worse (its validation tiles are degraded much more): the .pt stays the
    first run's best."""
    from stage2.train.app import run

    opt = tmp_path / "opt"
    for i in range(3):
        make_tile(opt / f"t{i}.npz", 48, 48, seed=i)
    common = ["hardware=cpu", f"optical_dir={opt}", "data.crop=32", "data.batch_size=4", "data.samples_per_epoch=8",
              "data.val_fraction=0.3", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
              "degradation@degrade=translator"]        # its noise_sd makes the resumed run validate worse
    first, second = tmp_path / "run1", tmp_path / "run2"
    for d in (first, second):
        d.mkdir()
    monkeypatch.chdir(first)            # outside a Hydra app the run dir is the working directory
    assert run(compose_app("train", [*common, "trainer.max_epochs=1"])) == 0
    (best_first,) = [c for c in (first / "checkpoints").glob("*.ckpt") if c.name != "last.ckpt"]
    monkeypatch.chdir(second)
    last = first / "checkpoints" / "last.ckpt"
    assert run(compose_app("train", [*common, "trainer.max_epochs=2", f"resume_from={last}",
                                     "degrade.noise_sd=[0.3,0.4]"])) == 0
    scores = {c.name: float(c.stem.split("val_loss")[1]) for c in (second / "checkpoints").glob("epoch*.ckpt")}
    assert scores and min(scores.values()) > float(best_first.stem.split("val_loss")[1])
    exported, first_best = stage2.load_model(second / "stage2_refiner.pt"), stage2.load_model(best_first)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), first_best.state_dict().values(),
                                                  strict=True))
    summary = json.loads((second / "train_summary.json").read_text())
    assert summary["lightning_checkpoint"] == str(best_first)
