"""Known conditions in predict (SPEC 6): a checkpoint that records the months and biomes it was
trained on runs a tile on its learned "unknown" where the metadata is missing or the value was never
trained on (`unseen_conditioning=unknown`, the default; `as_is` passes it), says so in each output JSON
(`processing.conditioning`) and counts it in the summary; a checkpoint without the record runs as before."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import stage2
from helpers import compose_app, make_tile, read_opt_v2
from stage2.checkpoint import conditioning_record
from stage2.predict.app import run

METAS = {
    "seen": {"month": 3, "biome_code": 4},
    "unseen_month": {"month": 7, "biome_code": 4},
    "unseen_biome": {"month": 3, "biome_code": 9},
    "missing": {"biome_code": 4},          # no month: June written, "unknown" given
    "windowed": {"month": 8, "biome_code": 0},
}


@pytest.fixture
def recorded_ckpt(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model)
    model.conditioning = conditioning_record([3, 8], [0, 4], month_dropout=0.2, biome_dropout=0.2)
    return stage2.save_checkpoint(model, tmp_path / "recorded.pt")


def _tiles(inp):
    for i, (name, meta) in enumerate(METAS.items()):
        size = 100 if name == "windowed" else 48
        make_tile(inp / f"{name}.npz", size, size, seed=i, meta=meta)


def _run(tmp_path, ckpt, *overrides):
    inp, out = tmp_path / "in", tmp_path / f"out{len(overrides)}"
    _tiles(inp)
    # the 100 px tile is refined in windows, whose month and biome come the same way
    cfg = compose_app("predict", ["hardware=cpu", "precision=32", "window.above=64", "window.size=64",
                                  "window.overlap=16", *overrides], tmp_path / "run", checkpoint=ckpt,
                      input_dir=inp, output_dir=out)
    return run(cfg), inp, out


def _alone(model, inp, name, month, biome):
    v1 = torch.from_numpy(np.load(inp / f"{name}.npz")["opt_v1"])[None]
    with torch.inference_mode():
        return model(v1, torch.tensor([month]), torch.tensor([biome]))[0].numpy()


def test_a_recording_checkpoint_runs_missing_and_unseen_conditions_on_unknown(tmp_path, recorded_ckpt, capsys):
    code, inp, out = _run(tmp_path, recorded_ckpt)
    assert code == 0
    js = {n: json.loads((out / f"{n}.json").read_text()) for n in METAS}
    cond = {n: j["processing"]["conditioning"] for n, j in js.items()}
    assert cond["seen"] == {"month": {"value": 3, "model": 3, "status": "seen"},
                            "biome_code": {"value": 4, "model": 4, "status": "seen"}}
    assert cond["unseen_month"]["month"] == {"value": 7, "model": "unknown", "status": "unseen"}
    assert cond["unseen_biome"]["biome_code"] == {"value": 9, "model": "unknown", "status": "unseen"}
    assert cond["missing"]["month"] == {"value": 6, "model": "unknown", "status": "missing"}
    assert cond["windowed"]["biome_code"] == {"value": 0, "model": "unknown", "status": "seen"}
    # the JSON keeps the tile's own values: June and the defaults list for the missing month
    assert (js["missing"]["month"], js["missing"]["metadata_defaults"]) == (6, ["month"])
    assert (js["unseen_month"]["month"], js["unseen_biome"]["biome_code"]) == (7, 9)

    model = stage2.load_model(recorded_ckpt)
    given = {"seen": (3, 4), "unseen_month": (0, 4), "unseen_biome": (3, 0), "missing": (0, 4)}
    for name, (month, biome) in given.items():
        assert np.abs(_alone(model, inp, name, month, biome) - read_opt_v2(out / f"{name}.npz")).max() <= 1e-5
    assert not np.allclose(_alone(model, inp, "unseen_month", 7, 4), read_opt_v2(out / "unseen_month.npz"), atol=1e-4)

    summary = json.loads((out / "_stage2_summary.json").read_text())
    assert (summary["unseen_conditions"], summary["missing_conditions"], summary["metadata_defaults"]) == (2, 1, 1)
    printed = capsys.readouterr().out
    assert "2 tiles with a month or biome the checkpoint never trained on, 1 with one missing" in printed


def test_as_is_passes_unseen_values_and_still_counts_them(tmp_path, recorded_ckpt):
    code, inp, out = _run(tmp_path, recorded_ckpt, "unseen_conditioning=as_is")
    assert code == 0
    cond = json.loads((out / "unseen_month.json").read_text())["processing"]["conditioning"]
    assert cond["month"] == {"value": 7, "model": 7, "status": "unseen"}
    model = stage2.load_model(recorded_ckpt)
    assert np.abs(_alone(model, inp, "unseen_month", 7, 4) - read_opt_v2(out / "unseen_month.npz")).max() <= 1e-5
    assert json.loads((out / "missing.json").read_text())["processing"]["conditioning"]["month"]["model"] == "unknown"
    assert json.loads((out / "_stage2_summary.json").read_text())["unseen_conditions"] == 2


def test_a_checkpoint_without_the_record_runs_as_before(tmp_path, tiny_ckpt):
    code, inp, out = _run(tmp_path, tiny_ckpt)
    assert code == 0
    cond = json.loads((out / "missing.json").read_text())["processing"]["conditioning"]
    assert cond == {"month": {"value": 6, "model": 6, "status": "missing"},
                    "biome_code": {"value": 4, "model": 4, "status": "not_recorded"}}
    model = stage2.load_model(tiny_ckpt)
    for name in ("missing", "unseen_month"):
        js = json.loads((out / f"{name}.json").read_text())
        expect = _alone(model, inp, name, js["month"], js["biome_code"])
        assert np.abs(expect - read_opt_v2(out / f"{name}.npz")).max() <= 1e-5
    summary = json.loads((out / "_stage2_summary.json").read_text())
    assert (summary["unseen_conditions"], summary["missing_conditions"]) == (0, 1)


def test_an_unknown_policy_is_a_run_error(tmp_path, recorded_ckpt, capsys):
    code, _, out = _run(tmp_path, recorded_ckpt, "unseen_conditioning=guess")
    assert code == 2 and not out.exists()
    assert "unseen_conditioning='guess' is not one of unknown, as_is" in capsys.readouterr().err
