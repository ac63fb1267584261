"""Names from one listing: which keys are tiles, which outputs collide, when a tile's output is complete."""

from __future__ import annotations

from stage2 import formats


def test_inputs_of_a_listing_and_colliding_output_names():
    keys = ["b.tif", "a.npz", "a.json", "a.TIFF", "c.tiff", ".hidden.npz", "sub/d.npz", "notes.txt",
            "_stage2_summary.json", ".a.npz.123.tmp"]
    inputs, collide = formats.input_keys(keys)
    assert inputs == ["a.TIFF", "a.npz", "b.tif", "c.tiff", "sub/d.npz"]
    assert collide == {"a": ["a.TIFF", "a.npz"]}


def test_the_format_layer_imports_no_rasterio_or_fsspec():
    """`import stage2` and the NPZ fast path stay light: GDAL and fsspec load only when a GeoTIFF or URL is used."""
    import subprocess
    import sys

    code = ("import sys, stage2.formats, stage2.formats.cog, stage2.store, stage2.product; "
            "heavy = [m for m in ('rasterio', 'fsspec', 's3fs', 'rio_cogeo', 'torch') if m in sys.modules]; "
            "print(heavy); assert not heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_tile_named_like_another_tiles_spread_layer_clashes_with_it():
    """`a.std.npz` would write `a.std.tif`, the per-pixel spread of `a` under tta: both fail, none is lost."""
    _, collide = formats.input_keys(["a.npz", "a.std.npz", "b.std.tif", "c.npz"])
    assert collide == {"a": ["a.npz"], "a.std": ["a.std.npz"]}
