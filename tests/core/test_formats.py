"""Names from one listing: which keys are tiles, which outputs collide, when a tile's output is complete."""

from __future__ import annotations

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
