"""Names from one listing: which keys are tiles, which outputs collide, when a tile's output is complete."""

from __future__ import annotations

import numpy as np
import pytest

from stage2 import formats


def test_inputs_of_a_listing_and_colliding_output_names():
    keys = ["b.tif", "a.npz", "a.json", "a.TIFF", "c.tiff", ".hidden.npz", "sub/d.npz", "notes.txt",
            "_stage2_summary.json", ".a.npz.123.tmp"]
    inputs, collide = formats.input_keys(keys)
    assert inputs == ["a.TIFF", "a.npz", "b.tif", "c.tiff", "sub/d.npz"]
    assert collide == {"a": ["a.TIFF", "a.npz"]}


@pytest.mark.parametrize("output_format, files", [
    ("npz", ["t.npz", "t.json"]),
    ("cog", ["t.tif", "t.json"]),
    ("both", ["t.npz", "t.tif", "t.json"]),
])
def test_output_files_json_last_and_done_only_when_all_are_listed(output_format, files):
    assert formats.output_keys("t", output_format) == files
    assert formats.is_done(set(files), "t", output_format)
    assert not formats.is_done(set(files[1:]), "t", output_format)
    assert not formats.is_done({"t.json"}, "t", output_format)


def test_unknown_output_format_is_named():
    with pytest.raises(ValueError, match="output_format='tiff'"):
        formats.output_keys("t", "tiff")


def test_the_format_layer_imports_no_rasterio_or_fsspec():
    """`import stage2` and the NPZ fast path stay light: GDAL and fsspec load only when a GeoTIFF or URL is used."""
    import subprocess
    import sys

    code = ("import sys, stage2.formats, stage2.formats.cog, stage2.storage; "
            "heavy = [m for m in ('rasterio', 'fsspec', 's3fs', 'rio_cogeo', 'torch') if m in sys.modules]; "
            "print(heavy); assert not heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_interrupt_right_after_the_json_rename_leaves_no_json_without_its_data(tmp_path, monkeypatch):
    """SIGINT/SIGTERM raise wherever Python is: after the JSON is in place but before write_output
    returns, the tile must leave nothing a rerun or a reader would take for a finished output."""
    from stage2 import storage
    from stage2.formats import cog, write_output

    real = storage.Folder.write_bytes

    def write_then_interrupt(self, key, data):
        real(self, key, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.Folder, "write_bytes", write_then_interrupt)
    arr = np.full((4, 16, 16), 0.5, np.float32)
    with pytest.raises(KeyboardInterrupt):
        write_output(tmp_path, "t0", arr, {"tile_id": "t0"}, output_format="npz", geo=None,
                     cog_settings=cog.CogSettings(compress="zstd", level=1, blocksize=256,
                                                   overviews="auto", resampling="average"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
