"""What a rerun trusts (SPEC 4): complete outputs of this checkpoint for unchanged inputs, nothing else."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import stage2
from helpers import compose_predict, make_tile, read_opt_v2
from stage2.checkpoint import fingerprint
from stage2.predict.app import run
from stage2.tiles import read_tile


@pytest.fixture(scope="module")
def other_ckpt(tiny_model, tmp_path_factory):
    """A 'retrained' checkpoint: the same architecture with other weights."""
    import copy

    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    path = tmp_path_factory.mktemp("retrained") / "retrained.pt"
    stage2.save_checkpoint(model, path)
    return path


def _run(capsys, ckpt, inp, out, *overrides):
    code = run(compose_predict(f"checkpoint={ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu",
                               "precision=32", *overrides))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def _summary(out):
    return json.loads((out / "_stage2_summary.json").read_text())


def _expected(ckpt, path):
    tile = read_tile(path)
    with torch.inference_mode():
        y = stage2.load_model(ckpt)(torch.from_numpy(tile.array)[None], torch.tensor([tile.month]),
                                    torch.tensor([tile.biome]))
    return y[0].numpy()


def test_a_retrained_checkpoint_never_mixes_into_the_folder(tmp_path, tiny_ckpt, other_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        make_tile(inp / f"t{i}.npz", 32, 32, seed=i)
    assert _run(capsys, tiny_ckpt, inp, out)[0] == 0
    first = {i: read_opt_v2(out / f"t{i}.npz") for i in range(3)}
    (out / "t1.json").unlink()       # a user deletes a few outputs, then reruns with the new checkpoint

    code, stdout, err = _run(capsys, other_ckpt, inp, out)
    assert code == 2 and len(err) == 1, err
    assert str(tiny_ckpt) in err[0] and str(other_ckpt) in err[0] and "skip_existing=false" in err[0]
    assert fingerprint(tiny_ckpt)["sha256"][:12] in err[0] and fingerprint(other_ckpt)["sha256"][:12] in err[0]
    assert not (out / "t1.json").exists() and np.array_equal(read_opt_v2(out / "t0.npz"), first[0])

    code, _, err = _run(capsys, other_ckpt, inp, out, "skip_existing=false")
    assert code == 0, err
    sha = fingerprint(other_ckpt)["sha256"]
    for i in range(3):
        assert json.loads((out / f"t{i}.json").read_text())["processing"]["checkpoint_sha256"] == sha
        # made by the other checkpoint: within fp32 batch noise of it (its tiles ran in a batch of three,
        # 1.2e-5 seen on this CPU), and far from the first checkpoint's output
        got = read_opt_v2(out / f"t{i}.npz")
        assert np.abs(got - _expected(other_ckpt, inp / f"t{i}.npz")).max() <= 1e-4
        assert np.abs(got - first[i]).max() > 1e-3
    assert _summary(out)["checkpoint_sha256"] == sha
    assert "nothing to do: 3 tiles" in _run(capsys, other_ckpt, inp, out)[1]


def test_truncated_outputs_and_changed_inputs_are_redone(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(4):
        make_tile(inp / f"t{i}.npz", 32, 32, seed=i, meta={"month": 5})
    assert _run(capsys, tiny_ckpt, inp, out)[0] == 0
    data = (out / "t0.npz").read_bytes()
    (out / "t0.npz").write_bytes(data[: len(data) // 2])          # truncated NPZ, its JSON still there
    make_tile(inp / "t1.npz", 32, 32, seed=99, meta={"month": 5})  # input replaced after its output was written
    (inp / "t2.json").write_text(json.dumps({"month": 11}))        # sidecar edited: the month changes the output
    code, _, err = _run(capsys, tiny_ckpt, inp, out)
    assert code == 0, err
    s = _summary(out)
    assert (s["processed"], s["skipped"], s["redone_stale"]) == (3, 1, 2)
    for i in range(3):
        assert np.abs(read_opt_v2(out / f"t{i}.npz") - _expected(tiny_ckpt, inp / f"t{i}.npz")).max() <= 1e-5
    assert json.loads((out / "t2.json").read_text())["month"] == 11


def test_an_output_whose_input_now_fails_is_removed(tmp_path, tiny_ckpt, capsys):
    """The old output belongs to an input that no longer exists as such: it must not stay as if current."""
    inp, out = tmp_path / "in", tmp_path / "out"
    make_tile(inp / "a.npz", 32, 32)
    make_tile(inp / "b.npz", 32, 32, seed=1)
    assert _run(capsys, tiny_ckpt, inp, out)[0] == 0
    np.savez(inp / "a.npz", opt_v1=np.full((4, 32, 32), np.nan, np.float32))
    assert _run(capsys, tiny_ckpt, inp, out)[0] == 1
    assert not (out / "a.json").exists() and not (out / "a.npz").exists() and (out / "b.json").is_file()


def test_the_finished_folder_rerun_does_not_hash_the_checkpoint_again(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """The summary keeps the checkpoint's (path, size, mtime, sha256): a finished AOI's rerun reads no checkpoint."""
    inp, out, ckpt = tmp_path / "in", tmp_path / "out", tmp_path / "model.pt"
    shutil.copy(tiny_ckpt, ckpt)
    make_tile(inp / "a.npz", 32, 32)
    assert _run(capsys, ckpt, inp, out)[0] == 0

    def no_hashing(*a, **k):
        raise AssertionError("the checkpoint was hashed again")

    monkeypatch.setattr("stage2.checkpoint.hashlib.sha256", no_hashing)
    assert "nothing to do: 1 tiles" in _run(capsys, ckpt, inp, out)[1]
    os.utime(ckpt, ns=(1, 1))         # touched: the cache no longer applies, the file is read again
    with pytest.raises(AssertionError, match="hashed again"):
        fingerprint(ckpt, _summary(out)["checkpoint_fingerprint"])


def test_precision_is_recorded_as_lightning_ran_it(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """precision=16 on a CPU: Lightning runs bf16-mixed (no fp16 autocast there), and that is what is recorded."""
    inp, out = tmp_path / "in", tmp_path / "out"
    make_tile(inp / "a.npz", 32, 32)
    from stage2.predict import module

    casts, real_cast = [], module.cast_matmul_weights
    monkeypatch.setattr(module, "cast_matmul_weights", lambda m, dtype: casts.append((m, dtype)) or real_cast(m, dtype))
    code = run(compose_predict(f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu",
                               "precision=16"))
    assert code == 0
    assert [dtype for _, dtype in casts] == [torch.bfloat16]      # cast once for the run, not per batch
    assert all(p.dtype == torch.float32 for p in casts[0][0].parameters())   # and given back afterwards
    assert json.loads((out / "a.json").read_text())["processing"]["precision"] == "bf16-mixed"
    assert json.loads((out / "a.json").read_text())["processing"]["use_amp"] is True
    assert _summary(out)["precision"] == "bf16-mixed"
    # The run casts the model's matmul weights to bf16 once (not per batch): the values are those of
    # the checkpoint's model under bf16 autocast, bit for bit.
    tile, model = read_tile(inp / "a.npz"), stage2.load_model(tiny_ckpt)
    x = torch.from_numpy(tile.array)[None]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x, torch.tensor([tile.month]), torch.tensor([tile.biome]))[0].float().numpy()
    assert np.array_equal(read_opt_v2(out / "a.npz"), ref)


def test_recursive_run_with_symlinked_folders_and_its_output_dir_inside_input_dir(tmp_path, tiny_ckpt, capsys):
    """All five tiles are found (two through a linked folder), the symlinked tile keeps its sidecar, and the
    outputs inside input_dir are never taken for inputs: the rerun has nothing to do."""
    inp, real = tmp_path / "aoi", tmp_path / "elsewhere"
    make_tile(inp / "a.npz", 32, 32, meta={"month": 2})
    make_tile(inp / "sub" / "b.npz", 32, 32, seed=1)
    make_tile(real / "c.npz", 32, 32, seed=2, meta={"month": 8, "stage": "stage1_translated", "score": float("nan")})
    make_tile(real / "deep" / "d.npz", 32, 32, seed=3)
    make_tile(tmp_path / "stage1" / "e.npz", 32, 32, seed=4, meta={"month": 12})
    (inp / "linked").symlink_to(real, target_is_directory=True)
    (inp / "e.npz").symlink_to(tmp_path / "stage1" / "e.npz")
    out = inp / "refined"
    code, _, err = _run(capsys, tiny_ckpt, inp, out, "recursive=true")
    assert code == 0, err
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json")
                   if not p.relative_to(out).parts[0].startswith("_stage2_"))
    assert names == ["a.json", "e.json", "linked/c.json", "linked/deep/d.json", "sub/b.json"]
    assert json.loads((out / "e.json").read_text())["month"] == 12
    c = json.loads((out / "linked" / "c.json").read_text())
    assert (c["month"], c["stage"], c["stage1"], c["score"]) == (8, "stage2_refined", {"stage": "stage1_translated"},
                                                                 None)
    code, stdout, err = _run(capsys, tiny_ckpt, inp, out, "recursive=true")
    assert code == 0 and "nothing to do: 5 tiles" in stdout, err
    assert not (out / "_stage2_failures.jsonl").exists()
