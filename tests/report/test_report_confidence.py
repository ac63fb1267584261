"""The report of a run with test-time augmentation (SPEC 12): per tile the change map and the std map,
the table's std mean and mean change, and words that say the metrics against opt_v1 are change, not error.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import make_tile
from stage2.predict.app import run as predict
from stage2.product import write_output
from stage2.report.app import make_report
from stage2.report.check import change_map, mean_change


def _png_width(path: Path) -> int:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big")


def _cells(page: str, name: str) -> list[str]:
    """The tile table's cells of tile `name` (text only)."""
    body = page.split('<table class="tiles" id="tile-table">')[1].split("<tbody>")[1].split("</tbody>")[0]
    row = next(r for r in re.findall(r"<tr[^>]*>.*?</tr>", body, flags=re.S) if f">{name}</a>" in r)
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]


def _headers(page: str) -> list[str]:
    head = page.split('<table class="tiles" id="tile-table">')[1].split("</thead>")[0]
    return re.findall(r"<th[^>]*>(.*?)</th>", head)


def _predict(cfg, **settings) -> None:
    for key, value in settings.items():
        setattr(cfg, key, value)
    with contextlib.redirect_stdout(io.StringIO()):
        assert predict(cfg) == 0


@pytest.mark.parametrize("output_format", ["npz", "cog"])
def test_a_tta_run_shows_std_and_change_per_tile(tmp_path, cfg_predict, output_format):
    inp, out = tmp_path / "in", tmp_path / "out"
    v1 = {n: make_tile(inp / f"{n}.npz", 32, 40, seed=s) for n, s in (("a", 1), ("b", 2))}
    _predict(cfg_predict, tta="flips", output_format=output_format)

    chk, index, lines = make_report(inp, out, out / "_report", max_tiles=5, recursive=False)

    assert chk.ok and chk.outputs == 2, lines                 # b.std.tif is a layer, not an output without input
    page = index.read_text(encoding="utf-8")
    heads = _headers(page)
    assert "std mean (TTA)" in heads and "mean change |opt_v2 - opt_v1|" in heads
    from stage2.product import read_output
    for name in v1:
        layers = read_output(out / name).layers
        cells = dict(zip(heads, _cells(page, name), strict=True))
        assert cells["std mean (TTA)"] == f"{layers['opt_v2_std'].astype(np.float64).mean():.5f}"
        assert cells["mean change |opt_v2 - opt_v1|"] == f"{np.abs(layers['opt_v2'] - v1[name]).mean():.4f}"
    assert any(line.startswith("  confidence  mean change") and "std across TTA passes" in line for line in lines)
    assert "std across the TTA passes" in page and "fixed scale 0-" in page


def test_the_change_and_std_maps_are_panels_of_each_figure(tmp_path):
    """A tile's PNG gains a panel for the std where the output has one; the same tile without it has four."""
    from stage2.report.figures import tile_figure

    v1 = make_tile(tmp_path / "x.npz", 48, 48, seed=4)
    v2 = np.clip(v1 * 1.05, 0, 1)
    std = np.full_like(v1, 0.004)
    args = (v1, v2, 6, 0, 0.01, 0.99, False)
    with_std = _png_width(tile_figure(tmp_path / "s.png", "x", *args, std=std))
    without = _png_width(tile_figure(tmp_path / "n.png", "x", *args))
    assert with_std > without * 1.15


def test_change_map_is_the_band_mean_of_the_absolute_change_and_skips_no_data():
    rng = np.random.default_rng(0)
    v1, v2 = (rng.uniform(0, 1, (4, 20, 24)).astype(np.float32) for _ in range(2))
    v2[:, 3, 4] = np.nan
    nodata = np.zeros((20, 24), bool)
    nodata[10:, :] = True
    m = change_map(v1, v2)
    np.testing.assert_allclose(m, np.abs(v2 - v1).mean(axis=0), rtol=1e-6)
    ok = ~nodata & np.isfinite(m)
    assert mean_change(v1, v2, nodata) == pytest.approx(np.abs(v2 - v1).mean(axis=0)[ok].mean(), rel=1e-6)


def test_std_and_change_are_computed_where_the_json_has_none(tmp_path):
    """An output with a std layer whose JSON carries no `confidence`: the report computes both from the arrays."""
    inp, out = tmp_path / "in", tmp_path / "out"
    v1 = make_tile(inp / "t.npz", 32, 32, seed=7)
    v2 = np.clip(v1 + 0.02, 0, 1).astype(np.float32)
    std = np.random.default_rng(1).uniform(0, 0.01, v1.shape).astype(np.float32)
    out.mkdir()
    meta = {"stage": "stage2_refined", "timestamp": "2026-01-01T00:00:00+00:00", "processing": {"tta": "d4"}}
    write_output(out, "t", {"opt_v2": v2, "opt_v2_std": std}, meta, output_format="npz", geo=None,
                 cog_settings=None)
    chk, index, _ = make_report(inp, out, out / "_report", max_tiles=1, recursive=False)
    (row,) = chk.rows
    assert row.std_mean == pytest.approx(std.astype(np.float64).mean(), rel=1e-6)
    assert row.mean_change == pytest.approx(np.abs(v2 - v1).mean(), rel=1e-5)


def test_the_page_and_terminal_call_the_metrics_change_not_error(tmp_path, cfg_predict):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_tile(inp / "a.npz", 32, 32, seed=1)
    np.savez(inp / "noisy.npz", opt_v1=np.random.default_rng(0).uniform(0, 1, (4, 32, 32)).astype(np.float32))
    _predict(cfg_predict)
    chk, index, lines = make_report(inp, out, out / "_report", max_tiles=5, recursive=False)
    page = index.read_text(encoding="utf-8")

    banner = re.search(r'<p class="status[^"]*">(.*?)</p>', page, flags=re.S).group(1)
    below = sum(r.below for r in chk.rows)
    assert f"{below} of 2 tiles changed more than the guide&#x27;s preservation targets" in banner
    assert "not of their error" in banner and "python -m stage2.evaluate truth_dir=" in banner
    assert "below the quality targets" not in page and "below target" not in page
    quality = page.split('id="quality"')[1].split('id="tiles"')[0]
    assert "measure how much Stage 2 changed each tile, not its error" in quality
    assert "python -m stage2.evaluate truth_dir=DIR" in quality
    # a run without TTA: the mean change (every run writes it), no std column
    heads = _headers(page)
    assert "mean change |opt_v2 - opt_v1|" in heads and "std mean (TTA)" not in heads
    meta = json.loads((out / "a.json").read_text())
    assert _cells(page, "a")[heads.index("mean change |opt_v2 - opt_v1|")] == \
        f"{meta['confidence']['mean_abs_change']:.4f}"
    text = "\n".join(lines)
    assert "changed more than the guide's preservation targets" in text
    assert "how much Stage 2 changed a tile, not its error" in text and "python -m stage2.evaluate" in text
