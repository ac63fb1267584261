"""Bad checkpoints are run-level errors: one line naming the file, exit 2, nothing written (SPEC 5, 6)."""

import os
import random

import pytest
import torch

import stage2
from helpers import compose_app, make_tile, run_cli
from stage2.predict.app import run


class _RunsCode:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(tmp_path, tiny_model, tiny_ckpt):
    d = tmp_path / "ckpts"
    d.mkdir()
    marker = tmp_path / "PWNED"
    (d / "garbage.pt").write_bytes(random.Random(0).randbytes(4096))
    (d / "bad_pickle.pt").write_bytes(b"\x80\x02s.")   # the weights-only unpickler raises IndexError on it
    (d / "empty.pt").write_bytes(b"")
    (d / "a_dir.pt").mkdir()
    torch.save({"state_dict": {"encoder.w": torch.zeros(3)}, "stage": 1, "model": "terramind"}, d / "stage1.pt")
    torch.save({"stage3_checkpoint": 1, "state_dict": {"head.w": torch.zeros(3)}}, d / "stage3.pt")
    raw = torch.load(tiny_ckpt, weights_only=True)
    raw["model_config"] = {**raw["model_config"], "decoder_channels": 16}   # weights no longer fit
    torch.save(raw, d / "mismatch.pt")
    raw = torch.load(tiny_ckpt, weights_only=True)
    raw["state_dict"] = {k: v for k, v in raw["state_dict"].items() if "refine" not in k}
    torch.save(raw, d / "missing_keys.pt")
    torch.save({"stage2_checkpoint": 1, "model_config": {"backbone": "prithvi_eo_tiny"}, "payload": _RunsCode(marker),
                "state_dict": {}}, d / "runs_code.pt")
    for name, backbone in (("hub_backbone.pt", "timm_hf-hub:someone/model"),
                           ("timm_backbone.pt", "vit_base_patch16_224")):
        raw = torch.load(tiny_ckpt, weights_only=True)
        raw["model_config"] = {**raw["model_config"], "backbone": backbone}
        torch.save(raw, d / name)
    return {
        "missing.pt": "does not exist",
        "a_dir.pt": "is not a file",
        "garbage.pt": "not a safe Stage 2 checkpoint",
        "empty.pt": "unreadable",
        "bad_pickle.pt": "unreadable",
        "stage1.pt": "not a Stage 2 checkpoint",
        "stage3.pt": "not a Stage 2 checkpoint",
        "mismatch.pt": "do not match",
        "missing_keys.pt": "do not match",
        "runs_code.pt": "not a safe Stage 2 checkpoint",
        "hub_backbone.pt": "not a safe Stage 2 checkpoint: backbone 'timm_hf-hub:someone/model' is not one of",
        "timm_backbone.pt": "not a safe Stage 2 checkpoint: backbone 'vit_base_patch16_224'",
    }, d, marker


def _cfg(ckpt, inp, out):
    return compose_app("predict", ["hardware=cpu"], out.parent / "run", checkpoint=ckpt, input_dir=inp,
                       output_dir=out)


def test_each_bad_checkpoint_is_one_clear_line_and_nothing_is_written(tmp_path, tiny_model, tiny_ckpt, capsys):
    cases, d, marker = _bad_checkpoints(tmp_path, tiny_model, tiny_ckpt)
    inp = tmp_path / "in"
    make_tile(inp / "t.npz", 64, 64)
    for name, words in cases.items():
        out = tmp_path / f"out_{name}"
        assert run(_cfg(d / name, inp, out)) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and str(d / name) in err[0], (name, err)
        assert not out.exists(), name
    assert not marker.exists(), "a checkpoint ran code"


def test_code_running_pickle_from_the_command_line(tmp_path, tiny_model, tiny_ckpt):
    cases, d, marker = _bad_checkpoints(tmp_path, tiny_model, tiny_ckpt)
    inp = tmp_path / "in"
    make_tile(inp / "t.npz", 64, 64)
    r = run_cli([f"checkpoint={d / 'runs_code.pt'}", f"input_dir={inp}", f"output_dir={tmp_path / 'out'}",
                 "hardware=cpu"], cwd=tmp_path)
    assert r.returncode == 2
    assert "not a safe Stage 2 checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("setup,words", [
    (lambda tmp: None, "No tiles (*.npz, *.tif, *.tiff) found in"),
    (lambda tmp: (tmp / "in" / "x.txt").write_text("x"), "No tiles (*.npz, *.tif, *.tiff) found in"),
])
def test_no_tiles_is_a_run_error(tmp_path, tiny_ckpt, capsys, setup, words):
    (tmp_path / "in").mkdir()
    setup(tmp_path)
    assert run(_cfg(tiny_ckpt, tmp_path / "in", tmp_path / "out")) == 2
    expected = f"stage2: error: No tiles (*.npz, *.tif, *.tiff) found in {tmp_path / 'in'}"
    assert capsys.readouterr().err.strip() == expected
    assert not (tmp_path / "out").exists()


def test_missing_input_dir_and_unset_checkpoint(tmp_path, tiny_ckpt, capsys):
    assert run(_cfg(tiny_ckpt, tmp_path / "nope", tmp_path / "out")) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"stage2: error: input_dir {tmp_path / 'nope'} does not exist: point input_dir at the folder of Stage 1 tiles"]
    assert not (tmp_path / "out").exists()
    cfg = compose_app("predict", [f"input_dir={tmp_path}", f"output_dir={tmp_path / 'out'}"], tmp_path / "run")
    assert run(cfg) == 2
    assert capsys.readouterr().err.splitlines() == [
        "stage2: error: checkpoint is not set: pass checkpoint=PATH to a Stage 2 .pt or .ckpt file"]


def test_verbose_shows_the_traceback(tmp_path, tiny_ckpt):
    r = run_cli([f"checkpoint={tmp_path / 'missing.pt'}", f"input_dir={tmp_path}", f"output_dir={tmp_path / 'o'}",
                 "verbose=true"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr and "stage2: error: checkpoint" in r.stderr


def test_only_prithvi_backbones_are_built():
    with pytest.raises(ValueError, match="not one of terratorch's Prithvi backbones"):
        stage2.build_model({"backbone": "timm_hf-hub:someone/model", "decoder_channels": 8, "refine_channels": 8,
                            "n_months": 12, "n_biomes": 16})


def test_lightning_ckpt_layout_loads(tmp_path, tiny_model):
    state = {f"model.{k}": v for k, v in tiny_model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"stage2_checkpoint": 1, "model_config": tiny_model.config},
                "epoch": 3}, tmp_path / "last.ckpt")
    m = stage2.load_model(tmp_path / "last.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), tiny_model.state_dict().values(),
                                                 strict=True))
