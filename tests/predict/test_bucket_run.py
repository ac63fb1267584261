"""Runs whose input_dir and output_dir are S3 prefixes (SPEC 10), against a real S3 API on 127.0.0.1
(conftest.s3: moto in server mode): a full run equal to a local one, a rerun with nothing to do,
a kill and a resume, a bad tile, a missing bucket and missing credentials; report and evaluate."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from geotiffs import CRS, TRANSFORM, demo_array, write_geotiff
from helpers import compose_app, make_tile
from stage2.formats import cog
from stage2.predict import app
from stage2.store import Store, open_store
from stage2.store.remote import BucketStore
from stage2.tiles import GeoRef

N = 5


def _tiles(folder, n=N, size=64):
    for i in range(n):
        meta = {"month": 1 + i % 12, "biome_code": i % 16} if i % 2 else None       # odd tiles have a sidecar
        make_tile(folder / f"t{i:02d}.npz", size, size, seed=i, meta=meta)


def _cfg(tmp_path, ckpt, inp, out, *overrides, **values):
    return compose_app("predict", ["hardware=cpu", "precision=32", "batch_size=2", *overrides], tmp_path / "run",
                       checkpoint=ckpt, input_dir=inp, output_dir=out, **values)


def _npz(folder: Store, key: str) -> np.ndarray:
    with np.load(io.BytesIO(folder.read_bytes(key)), allow_pickle=False) as z:
        return z["opt_v2"]


def _json(folder: Store, key: str):
    return json.loads(folder.read_bytes(key))


def test_s3_to_s3_run_equals_the_local_run(s3, tmp_path, tiny_ckpt):
    local_in = tmp_path / "in"
    _tiles(local_in)
    write_geotiff(local_in / "g.tif", demo_array())         # a georeferenced GeoTIFF beside the NPZ tiles
    inp = s3.upload(local_in, "stage1")
    out = open_store(s3.url("stage2"))
    assert app.run(_cfg(tmp_path, tiny_ckpt, inp, out.url, "output_format=both")) == 0
    assert app.run(_cfg(tmp_path, tiny_ckpt, local_in, tmp_path / "local")) == 0

    keys = set(out.listing())
    names = [f"t{i:02d}" for i in range(N)] + ["g"]
    assert keys == {f"{n}{s}" for n in names for s in (".npz", ".tif", ".json")} | {
        "_stage2_summary.json", "_stage2_index.json", "_stage2_tiles.txt", "_stage2_terratorch.yaml"}
    assert out.read_bytes("_stage2_tiles.txt").decode().splitlines() == sorted(names)
    collection = _json(out, "_stage2_stac/collection.json")         # whole objects, like the outputs
    assert sum(link["rel"] == "item" for link in collection["links"]) == len(names)
    for n in names:
        want = np.load(tmp_path / "local" / f"{n}.npz")["opt_v2"]
        np.testing.assert_allclose(_npz(out, f"{n}.npz"), want, atol=1e-6)
        with out.local_copy(f"{n}.tif") as here:
            np.testing.assert_allclose(cog.read_cog(here / f"{n}.tif").array, want, atol=1e-6)
        meta = _json(out, f"{n}.json")
        source = next(p for p in local_in.glob(f"{n}.*") if p.suffix != ".json")
        assert meta["processing"]["input_file"] == f"{inp}/{source.name}"
        assert meta["processing"]["input_size"] == source.stat().st_size
    assert _json(out, "t01.json")["month"] == 2
    with out.local_copy("g.tif") as here:
        assert cog.read_cog(here / "g.tif").geo == GeoRef(CRS, TRANSFORM)       # the GeoTIFF's place, kept
    summary = _json(out, "_stage2_summary.json")
    assert (summary["found"], summary["processed"], summary["failed"]) == (N + 1, N + 1, 0)
    assert summary["output_dir"] == out.url


def _finished_run(s3, tmp_path, ckpt, n=N):
    local_in = tmp_path / "in"
    _tiles(local_in, n)
    inp, out = s3.upload(local_in, "stage1"), open_store(s3.url("stage2"))
    assert app.run(_cfg(tmp_path, ckpt, inp, out.url)) == 0
    return local_in, inp, out


def test_rerun_of_a_finished_prefix_has_nothing_to_do_without_the_model_or_a_read_per_tile(
        s3, tmp_path, tiny_ckpt, capsys, monkeypatch):
    local_in, inp, out = _finished_run(s3, tmp_path, tiny_ckpt)
    capsys.readouterr()
    read = []
    real_read_many = BucketStore.read_many
    monkeypatch.setattr(BucketStore, "read_many", lambda self, keys: read.extend(keys) or real_read_many(self, keys))
    monkeypatch.setattr(app, "load_checked_model", lambda path: pytest.fail("the model was loaded"))
    outcome: dict = {}

    assert app.run(_cfg(tmp_path, tiny_ckpt, inp, out.url), outcome) == 0

    assert capsys.readouterr().out.strip() == f"nothing to do: {N} tiles already done in {out.url}"
    assert outcome["nothing_to_do"] == N and read == []      # the index answered for every tile
    assert "_stage2_lock.json" not in out.listing()


def test_the_nothing_to_do_process_imports_neither_torch_nor_terratorch(s3, tmp_path, tiny_ckpt):
    _, inp, out = _finished_run(s3, tmp_path, tiny_ckpt, n=2)
    args = [f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={out.url}", "hardware=cpu",
            f"hydra.run.dir={tmp_path / 'run2'}"]
    patch = ("import atexit, sys\n"
             "atexit.register(lambda: print('imported', 'torch' in sys.modules, 'terratorch' in sys.modules))")
    proc = _predict_process(args, patch, tmp_path, {**os.environ, "HF_HUB_OFFLINE": "1"})
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.splitlines() == [f"nothing to do: 2 tiles already done in {out.url}", "imported False False"]


def test_a_changed_input_and_a_lost_index_are_handled_from_the_listing(s3, tmp_path, tiny_ckpt, capsys):
    local_in, inp, out = _finished_run(s3, tmp_path, tiny_ckpt)
    before = out.read_bytes("t00.npz")
    time.sleep(1.1)     # S3's LastModified counts whole seconds: a run done within one second would hide the rewrite
    open_store(inp).write_bytes("t03.npz", (local_in / "t03.npz").read_bytes())     # a new LastModified: stale
    out.delete("_stage2_index.json")                    # as after a run killed before it wrote the index
    capsys.readouterr()

    assert app.run(_cfg(tmp_path, tiny_ckpt, inp, out.url)) == 0

    summary = _json(out, "_stage2_summary.json")
    assert (summary["processed"], summary["skipped"], summary["redone_stale"]) == (1, N - 1, 1)
    assert out.read_bytes("t00.npz") == before
    assert sorted(_json(out, "_stage2_index.json")["tiles"]) == [f"t{i:02d}" for i in range(N)]


def test_a_bad_tile_in_the_bucket_is_listed_in_the_bucket_and_the_others_are_written(s3, tmp_path, tiny_ckpt):
    local_in = tmp_path / "in"
    _tiles(local_in, 3)
    (local_in / "bad.npz").write_bytes(b"not a zip file at all")
    inp, out = s3.upload(local_in, "stage1"), open_store(s3.url("stage2"))

    # a DataLoader worker reads the tiles and writer threads upload them (the GPU profiles' way)
    assert app.run(_cfg(tmp_path, tiny_ckpt, inp, out.url, "num_workers=1", "writer_threads=2")) == 1

    lines = out.read_bytes("_stage2_failures.jsonl").decode().splitlines()
    assert len(lines) == 1
    failure = json.loads(lines[0])
    assert failure["file"] == f"{inp}/bad.npz" and failure["reason"] and failure["hint"]
    assert {k for k in out.listing() if k.endswith(".json") and not k.startswith("_")} == {
        "t00.json", "t01.json", "t02.json"}
    assert "bad.json" not in out.listing()
    summary = _json(out, "_stage2_summary.json")
    assert (summary["processed"], summary["failed"]) == (3, 1)


def _predict_process(args: list[str], patch: str, cwd, env: dict) -> subprocess.Popen:
    """`python -m stage2.predict ARGS` in its own process, with `patch` (Python source) applied first."""
    code = (f"import sys; sys.argv = ['stage2.predict', *{args!r}]\n{patch}\n"
            "from stage2.runtime import run_then_exit\nfrom stage2.predict.app import main\nrun_then_exit(main)\n")
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


# Each tile's JSON upload waits 0.4 s after its data file's: a kill most likely lands between the two.
SLOW_JSON = """
import time
from stage2.store.remote import BucketStore
from stage2.tiles import GeoRef
real = BucketStore.write_bytes
def write_bytes(self, key, data):
    if key.endswith('.json') and not key.startswith('_'):
        time.sleep(0.4)
    return real(self, key, data)
BucketStore.write_bytes = write_bytes
"""


def _check_whole(out: Store, listing, checked: set) -> None:
    """Every object under a final key is a whole output (no partial upload, no temporary names)."""
    for key in set(listing) - checked:
        assert key.rsplit(".", 1)[-1] in ("npz", "json", "txt") and not key.startswith("."), key
        if key.endswith(".txt"):
            assert set(out.read_bytes(key).decode().splitlines()) <= {k[:-5] for k in listing if k.endswith(".json")}
        elif key.endswith(".npz"):
            assert _npz(out, key).shape == (4, 64, 64)
        elif not key.startswith("_stage2_lock"):
            _json(out, key)
        checked.add(key)


def test_sigkill_mid_run_then_a_rerun_finishes_and_no_partial_object_is_ever_visible(s3, tmp_path, tiny_ckpt):
    n = 12
    local_in = tmp_path / "in"
    _tiles(local_in, n)
    inp, out = s3.upload(local_in, "stage1"), open_store(s3.url("stage2"))
    args = [f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={out.url}", "hardware=cpu", "precision=32",
            "batch_size=2", f"hydra.run.dir={tmp_path / 'run1'}"]
    proc = _predict_process(args, SLOW_JSON, tmp_path, {**os.environ, "HF_HUB_OFFLINE": "1"})
    checked: set = set()
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            listing = out.listing()
            _check_whole(out, listing, checked)
            if sum(k.endswith(".npz") for k in listing) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    listing = out.listing()
    _check_whole(out, listing, checked)
    done_before = {k[:-5] for k in listing if k.endswith(".json") and k.startswith("t")}
    assert "_stage2_lock.json" in listing and len(done_before) < n         # killed mid-run, lock left behind

    assert app.run(_cfg(tmp_path, tiny_ckpt, inp, out.url)) == 0         # takes the dead run's lock over

    listing = out.listing()
    _check_whole(out, listing, set())
    assert {k for k in listing if k.startswith("t")} == {f"t{i:02d}{s}" for i in range(n) for s in (".npz", ".json")}
    assert "_stage2_lock.json" not in listing
    summary = _json(out, "_stage2_summary.json")
    assert summary["skipped"] == len(done_before) and summary["processed"] == n - len(done_before)


def _user_run(args: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stage2.predict", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("case", ["missing bucket", "missing credentials"])
def test_a_missing_bucket_or_missing_credentials_is_exit_2_in_one_line_without_the_secret(
        s3, tmp_path, tiny_ckpt, case):
    local_in = tmp_path / "in"
    _tiles(local_in, 2)
    inp = s3.upload(local_in, "stage1")
    env = dict(os.environ)
    out = s3.url("stage2")
    if case == "missing bucket":
        out = "s3://no-such-bucket/stage2"
    else:
        del env["AWS_ACCESS_KEY_ID"]             # the secret alone is no credentials; it must not be printed
    run_dir = tmp_path / "run"
    r = _user_run([f"checkpoint={tiny_ckpt}", f"input_dir={inp}", f"output_dir={out}", "hardware=cpu",
                   f"hydra.run.dir={run_dir}"], env, tmp_path)

    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    line = r.stderr.strip()
    if case == "missing bucket":
        assert line == ("stage2: error: s3://no-such-bucket/stage2: the bucket 'no-such-bucket' does not exist "
                        "(or these credentials cannot see it): create it or correct the URL")
    else:
        assert line.startswith(f"stage2: error: {out}: no credentials for s3:// were found: set AWS_ACCESS_KEY_ID")
    logs = "".join(p.read_text() for p in run_dir.rglob("*") if p.is_file())
    assert s3.secret not in r.stdout + r.stderr + logs
    assert open_store(s3.url("")).listing(recursive=True).keys() == {f"stage1/{f.name}" for f in local_in.iterdir()}


def test_report_and_evaluate_read_a_bucket_run_and_write_into_it(s3, tmp_path, tiny_ckpt, capsys):
    from stage2.evaluate.app import run as evaluate
    from stage2.report.app import run as report

    local_in, inp, out = _finished_run(s3, tmp_path, tiny_ckpt, n=3)
    capsys.readouterr()

    assert report(compose_app("report", [], input_dir=inp, output_dir=out.url)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "inputs 3   complete outputs 3   problems 0" in lines[1]
    assert lines[-1] == f"report: {out.url}/_report/index.html"
    listing = out.listing(recursive=True)
    assert {"_report/index.html", "_report/quality.png", "_report/tiles/t00.png"} <= set(listing)
    page = out.read_bytes("_report/index.html").decode()
    assert f"<code>{out.url}</code>" in page and f"<code>{inp}</code>" in page

    assert evaluate(compose_app("evaluate", [], truth_dir=local_in, input_dir=inp, output_dir=out.url)) == 0
    text = capsys.readouterr().out
    assert f"saved {out.url}/_stage2_evaluation.json" in text
    ev = _json(out, "_stage2_evaluation.json")
    assert [t["name"] for t in ev["tiles"]] == ["t00", "t01", "t02"] and ev["output_dir"] == out.url
    assert {f"_stage2_evaluation/t0{i}.png" for i in range(3)} <= set(out.listing(recursive=True))


@pytest.mark.parametrize("where", ["memory -> local", "local -> memory"])
def test_any_fsspec_url_on_either_side(tmp_path, tiny_ckpt, capsys, where):
    """memory:// stands for any fsspec filesystem (gs:// works the same way through gcsfs)."""
    local_in = tmp_path / "in"
    _tiles(local_in, 3)
    mem = open_store(f"memory://stage2-{tmp_path.name}/{where.split()[0]}")
    if where.startswith("memory"):
        for f in local_in.iterdir():
            mem.write_bytes(f.name, f.read_bytes())
        inp, out = mem.url, tmp_path / "out"
    else:
        inp, out = local_in, mem.url
    assert app.run(_cfg(tmp_path, tiny_ckpt, inp, out)) == 0
    assert app.run(_cfg(tmp_path, tiny_ckpt, local_in, tmp_path / "reference")) == 0
    capsys.readouterr()
    outputs = open_store(out)
    for i in range(3):
        want = np.load(tmp_path / "reference" / f"t{i:02d}.npz")["opt_v2"]
        np.testing.assert_allclose(_npz(outputs, f"t{i:02d}.npz"), want, atol=1e-6)

    assert app.run(_cfg(tmp_path, tiny_ckpt, inp, out)) == 0
    assert capsys.readouterr().out.startswith("nothing to do: 3 tiles already done")


def test_an_aoi_under_a_bucket_data_root():
    cfg = compose_app("predict", ["aoi=iowa", "data_root=s3://bucket/data"])
    assert cfg.input_dir == "s3://bucket/data/stage1_outputs/iowa"
    assert cfg.output_dir == "s3://bucket/data/stage2_outputs/iowa"


def test_a_bucket_that_vanishes_mid_run_stops_the_run_in_one_line(s3, tmp_path, tiny_ckpt, capsys, monkeypatch):
    import requests

    from stage2.predict import writer

    local_in = tmp_path / "in"
    _tiles(local_in, 8)
    inp, out = s3.upload(local_in, "stage1"), open_store(s3.url("stage2"))
    real, calls = writer.write_output, []

    def write_output(*a, **k):
        if len(calls) == 3:      # the server forgets every bucket: the output bucket is gone
            requests.post(f"{s3.endpoint}/moto-api/reset", timeout=10).raise_for_status()
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(writer, "write_output", write_output)
    code = app.run(_cfg(tmp_path, tiny_ckpt, inp, out.url))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert err[0].startswith(f"stage2: stopped: {out.url}: the bucket 'stage2-test' does not exist"), err
    assert "3 tiles written, 0 failed" in err[0] and "summary not written" in err[0]
