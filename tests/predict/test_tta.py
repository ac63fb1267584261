"""Test-time augmentation (docs/confidence.md): opt_v2 is the mean of the passes mapped back, opt_v2_std
their per-pixel population std; the same whatever the batch, the workers, the OOM splits or the windows;
written through the product contract, trusted by a rerun only for the same `tta`.

The oracle is written here from the words of the contract, with numpy's rot90 and flip on the model of
`stage2.load_model` run on each transformed tile alone (it pads itself), not with stage2's own passes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import stage2
from helpers import compose_predict, make_tile, read_json
from stage2 import read_output
from stage2.predict.app import run
from stage2.predict.data import collate
from stage2.predict.module import Stage2Module
from stage2.tiles import BANDS, Tile, read_tile

CPU = ["hardware=cpu", "precision=32"]
TOL = 1e-5


# ---------------------------------------------------------------------------- the oracle
def d4_elements(tta: str) -> list[tuple[int, bool]]:
    """(quarter turns k, mirrored first): `flips` is {identity, left-right, up-down, both} = rotations by
    0 and 180 degrees with and without a mirror; `d4` every rotation with and without one."""
    turns = (0, 2) if tta == "flips" else (0, 1, 2, 3)
    return [(k, mirror) for k in turns for mirror in (False, True)]


def ensemble(model, v1: np.ndarray, month: int, biome: int, tta: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std (float64) of the model on each transformed tile alone, mapped back."""
    outs = []
    for k, mirror in d4_elements(tta):
        x = np.flip(v1, 2) if mirror else v1
        x = np.ascontiguousarray(np.rot90(x, k, axes=(1, 2)))
        with torch.inference_mode():
            y = model(torch.from_numpy(x)[None], torch.tensor([month]), torch.tensor([biome]))[0].double().numpy()
        y = np.rot90(y, -k, axes=(1, 2))
        outs.append(np.flip(y, 2) if mirror else y)
    stack = np.stack(outs)
    return stack.mean(0), stack.std(0)


def raised_cosine(n: int) -> np.ndarray:
    return 1e-3 + (1 - 1e-3) * np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2


def starts(length: int, size: int, overlap: int, patch: int = 16) -> tuple[list[int], int]:
    """Window starts on the patch grid, at most size - overlap apart, flush with the padded side."""
    padded = length + (-length) % patch
    win = min(size, padded)
    if padded <= win:
        return [0], win
    n = math.ceil((padded - win) / (size - overlap)) + 1
    return [patch * (i * ((padded - win) // patch) // (n - 1)) for i in range(n)], win


def windowed_ensemble(model, v1: np.ndarray, month: int, biome: int, tta: str, size: int,
                      overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """Each window's ensemble, blended: sum(w * mean) / sum(w) and sum(w * std) / sum(w)."""
    h, w = v1.shape[1:]
    (ys, wh), (xs, ww) = starts(h, size, overlap), starts(w, size, overlap)
    weight = np.outer(raised_cosine(wh), raised_cosine(ww))
    mean, std, den = np.zeros((4, h, w)), np.zeros((4, h, w)), np.zeros((h, w))
    for y in ys:
        for x in xs:
            window = np.ascontiguousarray(v1[:, y:y + wh, x:x + ww])
            m, s = ensemble(model, window, month, biome, tta)
            eh, ew = window.shape[1:]
            mean[:, y:y + eh, x:x + ew] += weight[:eh, :ew] * m
            std[:, y:y + eh, x:x + ew] += weight[:eh, :ew] * s
            den[y:y + eh, x:x + ew] += weight[:eh, :ew]
    return mean / den, std / den


# ---------------------------------------------------------------------------- helpers
SIZES = [(64, 64), (48, 80), (45, 70), (40, 66), (80, 48), (33, 33)]     # square, non-square, off the patch grid


def _tiles(inp: Path, sizes=SIZES) -> list[str]:
    names = []
    for i, (h, w) in enumerate(sizes):
        name = f"t{i}"
        make_tile(inp / f"{name}.npz", h, w, seed=i, meta={"month": 1 + i, "biome_code": 2 * i})
        names.append(name)
    return names


def _run(capsys, ckpt, inp, out, *overrides: str) -> tuple[int, str]:
    code = run(compose_predict(f"checkpoint={ckpt}", f"input_dir={inp}", f"output_dir={out}", *CPU, *overrides))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _module(model, tta: str, streams: int = 1) -> Stage2Module:
    return Stage2Module(model, compile=False, cpu_streams=streams, tta=tta, quality=True, pixel_stats="host")


# ---------------------------------------------------------------------------- the passes
@pytest.mark.parametrize("tta", ["flips", "d4"])
@pytest.mark.parametrize("shapes", [[(64, 64)], [(48, 80)], [(45, 70), (48, 80), (40, 66)]],
                         ids=["square", "non-square", "mixed-sizes-one-bucket"])
def test_predict_step_equals_the_ensemble_of_the_model_alone(tiny_model, tta, shapes):
    rng = np.random.default_rng(3)
    tiles = [Tile(f"t{i}", None, rng.random((4, h, w), dtype=np.float32), {}, 1 + i, 3 + i)
             for i, (h, w) in enumerate(shapes)]
    with torch.inference_mode():
        pred = _module(tiny_model, tta, streams=2).predict_step(collate(tiles, 16), 0)
    assert len(pred.outputs) == len(pred.stds) == len(tiles)
    for t, mean, std in zip(tiles, pred.outputs, pred.stds, strict=True):
        want_mean, want_std = ensemble(tiny_model, t.array, t.month, t.biome, tta)
        assert mean.dtype == std.dtype == np.float32 and mean.shape == std.shape == t.array.shape
        np.testing.assert_allclose(mean, want_mean, atol=TOL, rtol=0)
        np.testing.assert_allclose(std, want_std, atol=TOL, rtol=0)
        assert std.min() >= 0 and std.max() > 1e-4             # the passes really differ


def test_tta_none_is_the_plain_forward_bit_for_bit(tiny_model):
    rng = np.random.default_rng(4)
    tiles = [Tile(f"t{i}", None, rng.random((4, 45, 70), dtype=np.float32), {}, 6, 1) for i in range(3)]
    batch = collate(tiles, 16)
    with torch.inference_mode():
        pred = _module(tiny_model, "none").predict_step(batch, 0)
        plain = tiny_model.forward_padded(batch.x, batch.month, batch.biome).numpy()
    assert pred.stds == []
    for i, y in enumerate(pred.outputs):
        np.testing.assert_array_equal(y, plain[i, :, :45, :70])


def test_an_out_of_memory_split_gives_the_same_passes(tiny_model, monkeypatch):
    """A forward of more than 4 rows raises CUDA's OOM: the 2 tiles x 8 passes are halved down to fitting
    chunks, and every tile still equals its ensemble."""
    module = _module(tiny_model, "d4")
    real = module._forward_streams
    sizes = []

    def small_device(x, month, biome):
        sizes.append(x.shape[0])
        if x.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, month, biome)

    monkeypatch.setattr(module, "_forward_streams", small_device)
    rng = np.random.default_rng(5)
    tiles = [Tile(f"t{i}", None, rng.random((4, 48, 48), dtype=np.float32), {}, 4, 2) for i in range(2)]
    with torch.inference_mode():
        pred = module.predict_step(collate(tiles, 16), 0)
    assert sizes == [16, 8, 4, 4, 8, 4, 4]              # one forward of all passes, then halves
    assert pred.cpu_fallback == [False] * 2
    for t, mean, std in zip(tiles, pred.outputs, pred.stds, strict=True):
        want_mean, want_std = ensemble(tiny_model, t.array, 4, 2, "d4")
        np.testing.assert_allclose(mean, want_mean, atol=TOL, rtol=0)
        np.testing.assert_allclose(std, want_std, atol=TOL, rtol=0)


def test_bf16_autocast_runs_the_passes_close_to_fp32(tiny_model):
    rng = np.random.default_rng(6)
    tiles = [Tile("t", None, rng.random((4, 48, 80), dtype=np.float32), {}, 6, 0)]
    with torch.inference_mode():
        exact = _module(tiny_model, "d4").predict_step(collate(tiles, 16), 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = _module(tiny_model, "d4").predict_step(collate(tiles, 16), 0)
    assert half.outputs[0].dtype == half.stds[0].dtype == np.float32
    assert np.abs(half.outputs[0] - exact.outputs[0]).max() < 0.05
    assert np.abs(half.stds[0] - exact.stds[0]).mean() < 0.01


# ---------------------------------------------------------------------------- whole runs
def test_a_run_is_the_ensemble_whatever_the_batch_workers_and_streams(tmp_path, tiny_ckpt, capsys):
    inp = tmp_path / "in"
    names = _tiles(inp)
    runs = {"alone": ("batch_size=1", "num_workers=0", "cpu_streams=1"),
            "batched": ("batch_size=3", "num_workers=2", "cpu_streams=2")}
    got = {}
    for label, overrides in runs.items():
        out = tmp_path / label
        code, stdout = _run(capsys, tiny_ckpt, inp, out, "tta=d4", *overrides)
        assert code == 0, stdout
        got[label] = {n: read_output(out / f"{n}.npz").layers for n in names}
    model = stage2.load_model(tiny_ckpt)
    for n in names:
        tile = read_tile(inp / f"{n}.npz")
        want_mean, want_std = ensemble(model, tile.array, tile.month, tile.biome, "d4")
        for label in runs:
            layers = got[label][n]
            assert list(layers) == ["opt_v2", "opt_v2_std"]
            np.testing.assert_allclose(layers["opt_v2"], want_mean, atol=TOL, rtol=0, err_msg=f"{label} {n}")
            np.testing.assert_allclose(layers["opt_v2_std"], want_std, atol=TOL, rtol=0, err_msg=f"{label} {n}")
        for key in ("opt_v2", "opt_v2_std"):
            assert np.abs(got["alone"][n][key] - got["batched"][n][key]).max() <= TOL


def test_a_large_tile_blends_the_windows_means_and_stds(tmp_path, tiny_ckpt, capsys):
    """Windows of 64 px (overlap 16, above 96) keep the tile small; the blend is the one of test_windows."""
    inp, out = tmp_path / "in", tmp_path / "out"
    make_tile(inp / "big.npz", 150, 130, seed=7, meta={"month": 8, "biome_code": 5})
    make_tile(inp / "small.npz", 64, 64, seed=8, meta={"month": 8, "biome_code": 5})
    code, stdout = _run(capsys, tiny_ckpt, inp, out, "tta=flips", "window.size=64", "window.overlap=16",
                        "window.above=96", "batch_size=5")
    assert code == 0, stdout
    js = read_json(out / "big.json")
    assert js["processing"]["windows"]["count"] > 1 and js["processing"]["tta"] == "flips"
    model = stage2.load_model(tiny_ckpt)
    tile = read_tile(inp / "big.npz")
    want_mean, want_std = windowed_ensemble(model, tile.array, tile.month, tile.biome, "flips", 64, 16)
    layers = read_output(out / "big.npz").layers
    np.testing.assert_allclose(layers["opt_v2"], want_mean, atol=TOL, rtol=0)
    np.testing.assert_allclose(layers["opt_v2_std"], want_std, atol=TOL, rtol=0)
    _assert_confidence(js, tile.array, layers["opt_v2"], layers["opt_v2_std"])


def _assert_confidence(js: dict, v1: np.ndarray, v2: np.ndarray, std: np.ndarray | None) -> None:
    """The JSON's `confidence` against numpy on the arrays, over the valid (not NaN) pixels."""
    valid = ~np.isnan(v2[0])
    conf = js["confidence"]
    change = np.abs(v2.astype(np.float64) - v1)[:, valid]
    assert conf["mean_abs_change"] == pytest.approx(change.mean(), abs=1e-7)
    if std is None:
        assert set(conf) == {"mean_abs_change"}
        return
    assert set(conf) == {*BANDS, "mean_abs_change"}
    for band, s in zip(BANDS, std, strict=True):
        values = s[valid]
        assert np.isnan(s[~valid]).all()
        assert conf[band]["std_mean"] == pytest.approx(values.astype(np.float64).mean(), abs=1e-7)
        assert conf[band]["std_p95"] == pytest.approx(np.percentile(values, 95), abs=1e-7)


@pytest.mark.parametrize("tta", ["none", "flips"])
def test_the_json_confidence_is_numpy_on_the_arrays_and_the_summary_aggregates_it(tmp_path, tiny_ckpt, capsys, tta):
    inp, out = tmp_path / "in", tmp_path / "out"
    names = _tiles(inp, SIZES[:4])
    holes = make_tile(inp / "holes.npz", 48, 48, seed=9)
    holes[:, 5:20, 10:30] = np.nan                     # no data: left out of every statistic
    np.savez(inp / "holes.npz", opt_v1=holes)
    names.append("holes")
    code, stdout = _run(capsys, tiny_ckpt, inp, out, f"tta={tta}", "nan_policy=mask")
    assert code == 0, stdout
    per_tile = {}
    for n in names:
        js = read_json(out / f"{n}.json")
        layers = read_output(out / f"{n}.npz").layers
        v1 = np.load(inp / f"{n}.npz")["opt_v1"]
        assert js["processing"]["tta"] == tta
        _assert_confidence(js, v1, layers["opt_v2"], layers.get("opt_v2_std"))
        per_tile[n] = js["confidence"]
    summary = read_json(out / "_stage2_summary.json")["confidence"]
    assert (summary["tta"], summary["tiles"]) == (tta, len(names))
    assert summary["mean_abs_change"] == pytest.approx(np.mean([c["mean_abs_change"] for c in per_tile.values()]))
    assert "confidence   tta " + tta in stdout
    if tta == "none":
        assert "bands" not in summary
        return
    for band in BANDS:
        assert summary["bands"][band]["std_mean"] == pytest.approx(np.mean([c[band]["std_mean"]
                                                                            for c in per_tile.values()]))
        worst = max(per_tile, key=lambda n: per_tile[n][band]["std_p95"])
        assert summary["bands"][band]["std_p95_max"] == per_tile[worst][band]["std_p95"]
        assert summary["bands"][band]["std_p95_max_tile"] == worst
    assert "std p95 worst" in stdout


def test_tta_none_writes_what_a_run_always_wrote(tmp_path, tiny_ckpt, capsys):
    """One layer, no std file, the model alone bit for bit (batch 1: the same forward)."""
    inp, out = tmp_path / "in", tmp_path / "out"
    names = _tiles(inp, SIZES[:3])
    code, stdout = _run(capsys, tiny_ckpt, inp, out, "tta=none", "batch_size=1", "output_format=both")
    assert code == 0, stdout
    model = stage2.load_model(tiny_ckpt)
    for n in names:
        js = read_json(out / f"{n}.json")
        assert js["files"] == [{"path": f"{n}.npz", "format": "npz", "layers": ["opt_v2"]},
                               {"path": f"{n}.tif", "format": "cog", "layers": ["opt_v2"]}]
        assert not (out / f"{n}.std.tif").exists()
        with np.load(out / f"{n}.npz") as npz:
            assert npz.files == ["opt_v2"]
            v2 = npz["opt_v2"]
        tile = read_tile(inp / f"{n}.npz")
        with torch.inference_mode():
            alone = model(torch.from_numpy(tile.array)[None], torch.tensor([tile.month]), torch.tensor([tile.biome]))
        np.testing.assert_array_equal(v2, alone[0].numpy())
        assert list(read_output(out / f"{n}.tif").layers) == ["opt_v2"]


def test_cog_outputs_carry_the_std_as_their_own_cog_and_read_back(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    names = _tiles(inp, SIZES[:2])
    code, stdout = _run(capsys, tiny_ckpt, inp, out, "tta=flips", "output_format=both")
    assert code == 0, stdout
    for n in names:
        js = read_json(out / f"{n}.json")
        assert js["files"] == [{"path": f"{n}.npz", "format": "npz", "layers": ["opt_v2", "opt_v2_std"]},
                               {"path": f"{n}.tif", "format": "cog", "layers": ["opt_v2"]},
                               {"path": f"{n}.std.tif", "format": "cog", "layers": ["opt_v2_std"]}]
        npz = read_output(out / f"{n}.npz").layers
        for given in (f"{n}.tif", f"{n}.std.tif"):
            layers, meta, _ = read_output(out / given)
            assert list(layers) == ["opt_v2", "opt_v2_std"] and meta["processing"]["tta"] == "flips"
            for key in layers:
                assert layers[key].dtype == np.float32
                np.testing.assert_array_equal(layers[key], npz[key])
    tiles_list = (out / "_stage2_tiles.txt").read_text().split()
    assert tiles_list == names                          # the std COGs are not images of the hand-off


def test_a_rerun_with_another_tta_redoes_the_tiles(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    names = _tiles(inp, SIZES[:3])
    assert _run(capsys, tiny_ckpt, inp, out, "output_format=cog")[0] == 0
    plain = {n: read_output(out / f"{n}.tif").layers["opt_v2"] for n in names}

    code, stdout = _run(capsys, tiny_ckpt, inp, out, "output_format=cog", "tta=d4")
    assert code == 0 and "processed 3  skipped 0" in stdout, stdout
    assert all((out / f"{n}.std.tif").exists() for n in names)
    summary = read_json(out / "_stage2_summary.json")
    assert summary["redone_stale"] == 0 and summary["confidence"]["tta"] == "d4"

    assert "nothing to do: 3 tiles already done" in _run(capsys, tiny_ckpt, inp, out, "output_format=cog", "tta=d4")[1]
    (out / "t1.std.tif").unlink()                       # a std that went missing: that tile is redone
    code, stdout = _run(capsys, tiny_ckpt, inp, out, "output_format=cog", "tta=d4")
    assert code == 0 and "processed 1  skipped 2" in stdout, stdout

    code, stdout = _run(capsys, tiny_ckpt, inp, out, "output_format=cog")     # back to none: every tile again
    assert code == 0 and "processed 3  skipped 0" in stdout, stdout
    for n in names:
        assert not (out / f"{n}.std.tif").exists()
        assert read_json(out / f"{n}.json")["processing"]["tta"] == "none"
        np.testing.assert_array_equal(read_output(out / f"{n}.tif").layers["opt_v2"], plain[n])


def test_an_output_written_before_tta_existed_counts_as_none(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    _tiles(inp, SIZES[:2])
    assert _run(capsys, tiny_ckpt, inp, out)[0] == 0
    for n in ("t0", "t1"):
        js = read_json(out / f"{n}.json")
        del js["processing"]["tta"]
        (out / f"{n}.json").write_text(json.dumps(js))
    assert "nothing to do: 2 tiles already done" in _run(capsys, tiny_ckpt, inp, out)[1]
    assert "processed 2  skipped 0" in _run(capsys, tiny_ckpt, inp, out, "tta=flips")[1]


def test_an_unknown_tta_is_a_run_error_naming_the_key_and_the_choices(tmp_path, tiny_ckpt, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    _tiles(inp, SIZES[:1])
    code = run(compose_predict(f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={out}", *CPU,
                               "tta=rot90"))
    err = capsys.readouterr().err
    assert code == 2
    assert "tta='rot90' is not one of none, flips, d4" in err
    assert not out.exists()


@pytest.mark.parametrize("h, w, holes", [(64, 64, False), (37, 91, True), (1, 1, False), (16, 16, True)])
def test_the_confidence_statistics_are_numpys(h, w, holes):
    from stage2.predict.confidence import ChangeSum, confidence

    rng = np.random.default_rng(h * w)
    v1, v2 = (rng.random((4, h, w), dtype=np.float32) for _ in range(2))
    std = (rng.random((4, h, w), dtype=np.float32) * 0.02).astype(np.float32)
    valid = rng.random((h, w)) > 0.3 if holes else None
    keep = np.ones((h, w), bool) if valid is None else valid
    change = ChangeSum()
    for r in range(0, h, 7):                            # strip by strip, as a windowed tile adds them
        change.add(v1[:, r:r + 7], v2[:, r:r + 7], None if valid is None else valid[r:r + 7])
    conf = confidence(change, std, valid)
    assert conf["mean_abs_change"] == pytest.approx(np.abs(v2.astype(np.float64) - v1)[:, keep].mean(), abs=1e-9)
    for band, s in zip(BANDS, std, strict=True):
        assert conf[band]["std_mean"] == pytest.approx(s[keep].astype(np.float64).mean(), abs=1e-9)
        assert conf[band]["std_p95"] == pytest.approx(float(np.percentile(s[keep], 95)), abs=1e-8)
    nothing = confidence(ChangeSum(), std, np.zeros((h, w), bool))
    assert nothing["mean_abs_change"] is None and nothing["B02"] == {"std_mean": None, "std_p95": None}


def test_a_bucket_keeps_the_tta_in_its_index_and_reruns_by_it(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """memory:// stands for any bucket: there the index answers a rerun, so it must say the tta too."""
    import uuid

    from stage2.store import open_store
    from stage2.store.remote import BucketStore

    inp = tmp_path / "in"
    names = _tiles(inp, SIZES[:2])
    out = open_store(f"memory://stage2-tta/{uuid.uuid4().hex}")
    code, stdout = _run(capsys, tiny_ckpt, inp, out.url, "tta=flips", "output_format=cog")
    assert code == 0, stdout
    index = json.loads(out.read_bytes("_stage2_index.json"))["tiles"]
    assert {index[n]["tta"] for n in names} == {"flips"}
    assert {f"{n}.std.tif" for n in names} <= set(out.listing())
    layers = read_output(f"{out.url}/{names[0]}.std.tif").layers
    assert list(layers) == ["opt_v2", "opt_v2_std"]

    read = []
    real = BucketStore.read_many
    monkeypatch.setattr(BucketStore, "read_many", lambda self, keys: read.extend(keys) or real(self, keys))
    assert "nothing to do: 2 tiles" in _run(capsys, tiny_ckpt, inp, out.url, "tta=flips", "output_format=cog")[1]
    assert read == []                                   # the index answered for every tile
    code, stdout = _run(capsys, tiny_ckpt, inp, out.url, "tta=none", "output_format=cog")
    assert code == 0 and "processed 2  skipped 0" in stdout, stdout
    assert not any(k.endswith(".std.tif") for k in out.listing())
