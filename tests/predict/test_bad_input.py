"""Never lose a tile: a corpus of bad tiles beside awkward good ones, through the real config (SPEC 5)."""

import json
import pickle

import numpy as np
import pytest

from helpers import make_tile, read_opt_v2
from stage2.predict.app import run
from stage2.tiles import TileError, read_tile


def _npz(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _good(h=64, w=64, seed=0):
    return np.random.default_rng(seed).uniform(0.05, 0.9, (4, h, w)).astype(np.float32)


def build_bad(inp):
    """{file name: expected words in the reason}; every kind of bad tile of SPEC 5 and issue 4."""
    bad = {}

    inp.mkdir(parents=True, exist_ok=True)

    def add(name, words, writer):
        writer(inp / name)
        bad[name] = words

    add("empty_file.npz", "empty file", lambda p: p.write_bytes(b""))
    add("text_file.npz", "not an NPZ", lambda p: p.write_text("hello, I am not a zip"))
    add("pickle_file.npz", "not an NPZ", lambda p: p.write_bytes(pickle.dumps({"opt_v1": [1, 2]})))

    def truncated(p):
        _npz(p, opt_v1=_good())
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    add("truncated.npz", "truncated", truncated)
    add("npy_named_npz.npz", ".npy", lambda p: np.save(open(p, "wb"), _good()))
    add("wrong_key.npz", "found keys: ['data', 'meta']", lambda p: _npz(p, data=_good(), meta=np.arange(3)))
    add("object_array.npz", "object (pickled) array",
        lambda p: _npz(p, opt_v1=np.array([_good(), None], dtype=object)))
    add("rank2.npz", "wrong rank", lambda p: _npz(p, opt_v1=_good()[0]))
    add("rank4.npz", "wrong rank", lambda p: _npz(p, opt_v1=_good()[None]))
    add("three_bands.npz", "wrong channel count", lambda p: _npz(p, opt_v1=_good()[:3]))
    add("six_bands.npz", "wrong channel count", lambda p: _npz(p, opt_v1=np.concatenate([_good(), _good()[:2]])))
    add("channels_last.npz", "channels-last", lambda p: _npz(p, opt_v1=_good().transpose(1, 2, 0)))
    add("empty_array.npz", "empty array", lambda p: _npz(p, opt_v1=np.zeros((4, 0, 0), np.float32)))
    add("tiny_8px.npz", "smaller than 16", lambda p: _npz(p, opt_v1=_good(8, 8)))
    add("thin_strip.npz", "smaller than 16", lambda p: _npz(p, opt_v1=_good(120, 10)))

    def nan(p):
        a = _good()
        a[0, :2, :3] = np.nan
        _npz(p, opt_v1=a)
    add("nan.npz", "6 NaN", nan)

    def inf(p):
        a = _good()
        a[3, 5, 5] = np.inf
        a[3, 6, 6] = -np.inf
        _npz(p, opt_v1=a)
    add("inf.npz", "2 Inf", inf)
    add("uint16_dn.npz", "digital numbers", lambda p: _npz(p, opt_v1=(_good() * 10000).astype(np.uint16)))
    add("int32_dn.npz", "digital numbers", lambda p: _npz(p, opt_v1=(_good() * 10000).astype(np.int32)))
    add("float_x10000.npz", "far outside", lambda p: _npz(p, opt_v1=_good() * 10000))
    add("negative.npz", "far outside", lambda p: _npz(p, opt_v1=_good() - 0.5))
    add("bool_array.npz", "unsupported dtype", lambda p: _npz(p, opt_v1=_good() > 0.5))
    add("complex_array.npz", "unsupported dtype", lambda p: _npz(p, opt_v1=_good().astype(np.complex64)))

    def with_sidecar(text):
        def w(p):
            _npz(p, opt_v1=_good())
            p.with_suffix(".json").write_text(text, encoding="utf-8")
        return w
    add("json_invalid.npz", "not valid JSON", with_sidecar('{"month": 6,'))
    add("json_list.npz", "not an object", with_sidecar("[1, 2, 3]"))
    add("month_13.npz", "out of range 1-12", with_sidecar('{"month": 13}'))
    add("month_word.npz", "not a number 1-12", with_sidecar('{"month": "junuary"}'))
    add("month_half.npz", "month", with_sidecar('{"month": 6.5}'))
    add("biome_16.npz", "out of range 0-15", with_sidecar('{"biome_code": 16}'))
    add("biome_word.npz", "biome_code", with_sidecar('{"biome_code": "forest"}'))
    return bad


def build_good(inp):
    """{name: (H, W)} of awkward but valid tiles."""
    good = {}

    def add(name, h, w, meta=None, dtype=np.float32, tweak=None):
        arr = make_tile(inp / f"{name}.npz", h, w, seed=len(good), meta=meta, dtype=dtype)
        if tweak is not None:
            tweak(arr)
            np.savez(inp / f"{name}.npz", opt_v1=arr)
        good[name] = (h, w)

    add("good_june_name", 120, 120, {"month": "June", "biome_code": 4})
    add("good_sep_spaces", 64, 64, {"month": " SEP ", "biome_code": "3"})
    add("good_float_month", 64, 64, {"month": 6.0})
    add("good_no_sidecar", 64, 64)
    add("good_null_month", 64, 64, {"month": None, "biome_code": None, "keep": {"x": 1}})
    add("good_float64", 64, 80, {"month": 2}, dtype=np.float64)

    def slightly_out(a):
        a[0, 0, 0], a[1, 0, 1], a[3, 1, 1] = -0.005, 1.008, 1.01
    add("good_slightly_out", 64, 64, {"month": "jan"}, tweak=slightly_out)
    add("good_odd_97x133", 97, 133, {"month": 11})
    add("good_min_16", 16, 16)
    add("tuile été 01", 64, 64, {"month": "aug", "tile_id": "tuile été 01"})
    add("good_evil_tile_id", 64, 64, {"tile_id": "../../escaped", "month": 3})
    return good


def test_each_bad_kind_has_a_specific_reason(tmp_path):
    bad = build_bad(tmp_path)
    assert len(bad) >= 20
    for name, words in bad.items():
        with pytest.raises(TileError) as err:
            read_tile(tmp_path / name)
        assert words in err.value.reason, (name, err.value.reason)
        assert err.value.hint


def test_hints_say_what_to_do(tmp_path):
    bad = build_bad(tmp_path)
    hints = {}
    for name in bad:
        try:
            read_tile(tmp_path / name)
        except TileError as e:
            hints[name] = e.hint
    assert "divide by 10000" in hints["uint16_dn.npz"] and "divide by 10000" in hints["float_x10000.npz"]
    assert "transpose" in hints["channels_last.npz"]


def test_run_writes_every_good_tile_and_reports_every_bad_one(tmp_path, cfg_predict, capsys):
    inp, out = tmp_path / "aoi" / "in", tmp_path / "aoi" / "out"
    bad = build_bad(inp)
    good = build_good(inp)
    (inp / "a_folder.npz").mkdir()      # a directory that ends in .npz is ignored, not a crash
    cfg_predict.input_dir, cfg_predict.output_dir, cfg_predict.batch_size = str(inp), str(out), 3
    assert run(cfg_predict) == 1

    lines = [json.loads(x) for x in (out / "_stage2_failures.jsonl").read_text(encoding="utf-8").splitlines()]
    by_file = {json.loads(json.dumps(x))["file"]: x for x in lines}
    assert len(lines) == len(bad) == len(by_file)
    for name, words in bad.items():
        entry = by_file[str(inp / name)]
        assert words in entry["reason"] and entry["hint"]
        assert not (out / name).exists() and not (out / name.replace(".npz", ".json")).exists()

    for name, (h, w) in good.items():
        v2 = read_opt_v2(out / f"{name}.npz")
        assert v2.shape == (4, h, w) and v2.dtype == np.float32
        assert np.isfinite(v2).all() and 0 <= v2.min() and v2.max() <= 1
        js = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        assert js["stage"] == "stage2_refined" and 1 <= js["month"] <= 12
    assert json.loads((out / "good_evil_tile_id.json").read_text())["tile_id"] == "../../escaped"
    assert json.loads((out / "good_slightly_out.json").read_text())["processing"]["clipped_values"] == 3
    assert json.loads((out / "good_null_month.json").read_text())["metadata_defaults"] == ["month", "biome_code"]
    # nothing outside output_dir
    assert sorted(p.name for p in (tmp_path / "aoi").iterdir()) == ["in", "out"]
    assert not list(tmp_path.rglob("escaped*"))

    s = json.loads((out / "_stage2_summary.json").read_text())
    assert (s["found"], s["processed"], s["failed"], s["clipped"]) == (len(bad) + len(good), len(good), len(bad), 1)
    assert s["metadata_defaults"] == 9 and len(s["first_failures"]) == 5
    assert f"failed {len(bad)}  ignored 1" in capsys.readouterr().out

    # a rerun retries only the failed tiles (they may have been fixed) and keeps the same exit code
    np.savez(inp / "nan.npz", opt_v1=_good())
    cfg_predict.batch_size = 4
    assert run(cfg_predict) == 1
    s2 = json.loads((out / "_stage2_summary.json").read_text())
    assert (s2["skipped"], s2["processed"], s2["failed"]) == (len(good), 1, len(bad) - 1)
    assert (out / "nan.npz").is_file()
    assert len((out / "_stage2_failures.jsonl").read_text().splitlines()) == len(bad) - 1
