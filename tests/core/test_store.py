"""Folders on local disk and in object stores (SPEC 10), against a real S3 API on 127.0.0.1 (conftest.s3)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rio_cogeo.cogeo import cog_validate

from geotiffs import CRS, TILE_256, TRANSFORM, demo_array, write_geotiff
from stage2 import formats, tiles
from stage2.formats import cog, geotiff
from stage2.runtime import RunError
from stage2.store import Store, is_url, open_store, safe_url


class Boom(Exception):
    pass


def failing_writer(f):
    f.write(b"half of an output")
    raise Boom("killed mid-write")


# ---------------------------------------------------------------------------- local folders
def test_local_listing_names_sizes_and_times_once(tmp_path):
    (tmp_path / "a.npz").write_bytes(b"12345")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.tif").write_bytes(b"xy")
    (tmp_path / ".a.npz.123.tmp").write_bytes(b"temporary")

    flat, deep = open_store(tmp_path).listing(), open_store(f"file://{tmp_path}").listing(recursive=True)

    assert list(flat) == ["a.npz"] and list(deep) == ["a.npz", "sub/b.tif"]
    assert deep["a.npz"].size == 5 and deep["sub/b.tif"].size == 2
    assert deep["a.npz"].mtime == os.stat(tmp_path / "a.npz").st_mtime and deep["a.npz"].etag is None


def test_local_write_is_atomic_and_read_back(tmp_path):
    folder = open_store(tmp_path)
    with pytest.raises(Boom):
        folder.write("sub/x.npz", failing_writer)
    assert not (tmp_path / "sub" / "x.npz").exists() and list((tmp_path / "sub").iterdir()) == []

    folder.write_bytes("sub/x.npz", b"whole")
    assert folder.exists("sub/x.npz") and folder.read_bytes("sub/x.npz") == b"whole"
    folder.delete("sub/x.npz")
    folder.delete("sub/x.npz")                      # already gone: nothing happens
    assert not folder.exists("sub/x.npz")


def test_urls_and_their_credentials_in_messages():
    assert is_url("s3://b/p") and is_url("gs://b") and is_url("memory://x")
    assert not is_url("/data/tiles") and not is_url("file:///data") and not is_url("C:/data")
    assert safe_url("https://user:pa55@host/x") == "https://host/x"


# ---------------------------------------------------------------------------- S3 (moto server)
def count_requests(folder: Store, monkeypatch) -> Counter:
    """Count the S3 API calls a folder makes (s3fs sends every call through _call_s3)."""
    calls: Counter = Counter()
    real = folder.fs._call_s3

    async def counted(method, *args, **kwargs):
        calls[method] += 1
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(folder.fs, "_call_s3", counted)
    return calls


def test_s3_listing_is_one_request_with_sizes_times_and_etags(s3, monkeypatch):
    folder = open_store(s3.url("tiles"))
    for i in range(30):
        folder.write_bytes(f"t{i:02d}.npz", b"x" * i)
    folder.write_bytes("deeper/t.json", b"{}")

    calls = count_requests(folder, monkeypatch)
    flat = folder.listing()

    assert dict(calls) == {"list_objects_v2": 1}
    assert len(flat) == 30 and flat["t07.npz"].size == 7
    assert flat["t07.npz"].etag and flat["t07.npz"].mtime > 1.7e9
    assert "deeper/t.json" in folder.listing(recursive=True)
    assert open_store(s3.url("no/such/prefix")).listing() == {}


def test_s3_write_is_whole_or_nothing(s3):
    folder = open_store(s3.url("out"))
    with pytest.raises(Boom):
        folder.write("a.npz", failing_writer)          # the process "dies" while encoding
    assert folder.listing() == {} and not folder.exists("a.npz")

    folder.write_bytes("a.npz", b"complete")
    assert folder.read_bytes("a.npz") == b"complete"
    folder.delete("a.npz")
    assert folder.listing() == {}


def test_missing_bucket_is_one_run_error(s3):
    with pytest.raises(RunError) as e:
        open_store("s3://no-such-bucket/tiles").listing()
    assert str(e.value) == ("s3://no-such-bucket/tiles: the bucket 'no-such-bucket' does not exist (or these "
                            "credentials cannot see it): create it or correct the URL")


def test_missing_credentials_are_one_run_error_without_secrets(s3, monkeypatch):
    import s3fs

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(RunError) as e:
        open_store(s3.url("tiles")).listing()
    message = str(e.value)
    assert message.startswith(f"{s3.url('tiles')}: no credentials for s3:// were found")
    assert "AWS_ACCESS_KEY_ID" in message and "\n" not in message


def test_refused_credentials_are_one_run_error_without_secrets(s3):
    import requests

    requests.post(f"{s3.endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        with pytest.raises(RunError) as e:
            open_store(s3.url("tiles")).listing()
    finally:
        requests.post(f"{s3.endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
    assert "access denied" in str(e.value)
    assert s3.secret not in str(e.value) and "AKIAFAKEKEYID" not in str(e.value)


def test_unknown_protocols_and_missing_extras_name_the_fix():
    with pytest.raises(RunError, match=r"unknown protocol nosuch://"):
        open_store("nosuch://bucket/x")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(RunError, match=r"pip install 'stage2\[gcs\]'"):
            open_store("gs://bucket/x")


def test_geotiff_from_s3_to_cog_in_s3(s3, tmp_path):
    """A GeoTIFF tile in a bucket, read by windows over ranged requests; its COG uploaded whole and valid."""
    arr = demo_array(TILE_256)
    write_geotiff(tmp_path / "scene.tif", arr, blocksize=64)
    inp, out = open_store(s3.url("stage1")), open_store(s3.url("stage2"))
    inp.write_bytes("scene.tif", (tmp_path / "scene.tif").read_bytes())

    with geotiff.GeoTiff(inp.uri("scene.tif"), input_scale=None, input_offset=None) as tif:
        assert tif.header.geo == tiles.GeoRef(CRS, TRANSFORM)
        np.testing.assert_array_equal(tif.read((64, 0, 64, 256)), arr[:, 64:128])
        geo = tif.header.geo
    settings = cog.CogSettings(compress="zstd", level=1, blocksize=256, overviews="auto", resampling="average")
    assert cog.write_cog(out, "scene.tif", arr, geo, settings) is True

    assert list(out.listing()) == ["scene.tif"]
    back = cog.read_cog(out.uri("scene.tif"))
    np.testing.assert_array_equal(back.array, arr)
    assert back.geo == geo
    with out.local_copy("scene.tif") as local:
        assert cog_validate(str(local / "scene.tif"), quiet=True)[0]


def test_a_tile_and_its_sidecar_read_from_s3_equal_the_local_read(s3, tmp_path):
    np.savez(tmp_path / "t.npz", opt_v1=demo_array())
    (tmp_path / "t.json").write_text(json.dumps({"month": "jul", "biome_code": 3}))
    inp = open_store(s3.url("in"))
    for name in ("t.npz", "t.json"):
        inp.write_bytes(name, (tmp_path / name).read_bytes())

    listing = inp.listing()
    with inp.local_copy("t.npz", *[k for k in ["t.json"] if k in listing]) as local:
        remote = formats.read_tile(local / "t.npz", local, input_scale=None, input_offset=None)
    here = formats.read_tile(tmp_path / "t.npz", tmp_path, input_scale=None, input_offset=None)
    np.testing.assert_array_equal(remote.array, here.array)
    assert (remote.name, remote.month, remote.biome, remote.meta) == ("t", 7, 3, here.meta)


def test_memory_urls_work_like_buckets():
    folder = open_store("memory://stage2-mem/run")
    with pytest.raises(Boom):
        folder.write("a.json", failing_writer)
    folder.write_bytes("a.json", b"{}")
    assert list(folder.listing()) == ["a.json"] and folder.read_bytes("a.json") == b"{}"
    folder.delete("a.json")


def test_read_many_reads_a_failed_request_again_and_leaves_out_only_missing_keys(s3, monkeypatch):
    """A batch request that failed for another reason than a missing key is read once more on its own:
    a rerun must not take a flaky moment for a missing output JSON (and redo the tile)."""
    folder = open_store(s3.url("many"))
    for k in ("a.json", "b.json"):
        folder.write_bytes(k, k.encode())
    real = folder.fs.cat

    def flaky(paths, **kw):
        got = real(paths, **kw)
        got[folder._remote("b.json")] = ConnectionResetError("connection reset by peer")
        return got

    monkeypatch.setattr(folder.fs, "cat", flaky)
    assert folder.read_many(["a.json", "b.json", "missing.json"]) == {"a.json": b"a.json", "b.json": b"b.json"}


def test_a_killed_bucket_writers_scratch_folder_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """A bucket write encodes the object in a local scratch folder first; a process killed during it
    cannot remove that folder, so the next run removes every one whose process is gone."""
    import subprocess
    import sys
    import tempfile

    from stage2.store.remote import TEMP_PREFIX, temporary_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = ("import os, sys; sys.path[:0] = [sys.argv[1]]\n"
            "from stage2.store import open_store\n"
            "def produce(path):\n"
            "    path.write_bytes(b'half a COG')\n"
            "    os.kill(os.getpid(), 9)          # killed while the object is being encoded\n"
            "open_store('memory://stage2-killed/run').write_path('t.tif', produce)\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parents[2] / "src")], env=env)
    assert r.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 1 and left[0].startswith(TEMP_PREFIX)
    with temporary_folder() as mine:                    # this process's own is never touched
        store = open_store("memory://stage2-killed/run")
        assert store.clean_temporaries() == 1
        assert [p.name for p in tmp_path.iterdir()] == [Path(mine).name]
    assert list(tmp_path.iterdir()) == []
