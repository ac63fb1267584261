"""The report over a small real run: files, figures, the page, problems and exit codes (SPEC 7).

In this process through the composed conf/report.yaml; `python -m stage2.report` itself once.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from helpers import compose_app, make_tile, read_opt_v2, run_cli
from stage2.predict.app import run as predict
from stage2.quality import severity, tile_quality
from stage2.report.app import make_report
from stage2.report.app import run as report
from stage2.report.check import check_run

NAMES = ["a_field", "b_field", "c_flat", "field&river's_01"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_ckpt) -> tuple[Path, Path]:
    """Four small tiles through the real predict app: three field-like (one with an HTML-hostile name), one flat."""
    root = tmp_path_factory.mktemp("run")
    inp, out = root / "in", root / "out"
    make_tile(inp / f"{NAMES[0]}.npz", 32, 32, seed=1, meta={"month": 7, "biome_code": 4})
    make_tile(inp / f"{NAMES[1]}.npz", 48, 40, seed=2, meta={"month": "jan", "biome_code": 2})
    np.savez(inp / f"{NAMES[2]}.npz", opt_v1=np.full((4, 32, 32), 0.3, np.float32))
    make_tile(inp / f"{NAMES[3]}.npz", 32, 32, seed=3)
    cfg = compose_app("predict", ["hardware=cpu", "precision=32"], root / "run", checkpoint=tiny_ckpt,
                      input_dir=inp, output_dir=out)
    with contextlib.redirect_stdout(io.StringIO()):
        assert predict(cfg) == 0
    return inp, out


def _report(inp: Path, out: Path, **values) -> int:
    """`python -m stage2.report input_dir=INP output_dir=OUT [key=value ...]`, in this process."""
    return report(compose_app("report", [], input_dir=inp, output_dir=out, **values))


def _copy(run, tmp_path) -> tuple[Path, Path]:
    inp, out = run
    shutil.copytree(inp, tmp_path / "in")
    shutil.copytree(out, tmp_path / "out", ignore=shutil.ignore_patterns("_report"))
    return tmp_path / "in", tmp_path / "out"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _table_rows(page: str) -> list[str]:
    body = page.split('<table class="tiles" id="tile-table">')[1].split("</table>")[0]
    return re.findall(r"<tr[^>]*>.*?</tr>", body.split("<tbody>")[1], flags=re.S)


def _linked_images(page: str) -> list[str]:
    return sorted({unquote(m) for m in re.findall(r'(?:href|src)="([^"#]+\.png)"', page)})


def test_report_over_a_run(run, tmp_path):
    """The smoke test of `python -m stage2.report` as a user types it (one subprocess)."""
    inp, out = run
    r = run_cli([f"input_dir={inp}", f"output_dir={out}"], cwd=tmp_path, module="stage2.report")
    assert r.returncode == 0, r.stdout + r.stderr
    report = out / "_report"
    index = report / "index.html"
    assert r.stdout.rstrip().splitlines()[-1] == f"report: {index.resolve()}"
    assert "inputs 4   complete outputs 4   problems 0" in r.stdout
    assert "1 flat" in r.stdout
    assert not (tmp_path / "outputs").exists()          # the report writes only into report_dir

    # One figure per tile (4 < max_tiles), sensible sizes, plus the histograms.
    pngs = sorted(p.relative_to(report).as_posix() for p in report.rglob("*.png"))
    assert pngs == sorted(["quality.png"] + [f"tiles/{n}.png" for n in NAMES])
    for p in report.rglob("*.png"):
        w, h = _png_size(p)
        assert 800 <= w <= 2500 and 300 <= h <= 1000, (p, w, h)
        assert p.stat().st_size > 10_000

    page = index.read_text(encoding="utf-8")
    rows = _table_rows(page)
    assert len(rows) == 4
    for rel in _linked_images(page):
        assert (report / rel).is_file(), rel
    assert "field&amp;river&#x27;s_01" in page and "field&river's" not in page
    assert "tiles/field%26river%27s_01.png" in page

    # The table shows the run's own metrics, worst first; the flat tile says null, never NaN.
    quality = {n: json.loads((out / f"{n}.json").read_text())["quality"] for n in NAMES}
    assert quality["c_flat"]["edge_preservation"] is None
    expected_order = sorted(NAMES, key=lambda n: (-severity(quality[n]), n))
    shown = [re.search(r"<td>(?:<a [^>]*>)?([^<]+)", row).group(1) for row in rows]
    assert shown == [n.replace("&", "&amp;").replace("'", "&#x27;") for n in expected_order]
    for n, row in zip(expected_order, rows, strict=False):
        assert f"{quality[n]['ndvi_rmse']:.4f}" in row
        if quality[n]["edge_preservation"] is None:
            assert "null" in row and "flat" in row
        else:
            assert f"{quality[n]['edge_preservation']:.3f}" in row
    assert "NaN" not in page

    # The run summary has the quality figures the issue asks for.
    summary = json.loads((out / "_stage2_summary.json").read_text())
    q = summary["quality"]
    assert q["undefined"] == 1 and q["tiles"] == 4
    worst = max(NAMES, key=lambda n: quality[n]["ndvi_rmse"])
    assert q["ndvi_rmse"]["worst_tile"] == worst
    assert q["ndvi_rmse"]["mean"] == pytest.approx(np.mean([quality[n]["ndvi_rmse"] for n in NAMES]))


def test_max_tiles_draws_the_worst_and_report_dir_is_honoured(run, tmp_path):
    inp, out = run
    rdir = tmp_path / "elsewhere"
    chk, index, lines = make_report(inp, out, rdir, max_tiles=1, recursive=False)
    assert chk.ok and index == (rdir / "index.html").resolve()
    figs = [p.name for p in (rdir / "tiles").glob("*.png")]
    worst = max(chk.rows, key=lambda r: (severity(r.quality), r.name))
    assert figs == [f"{worst.name}.png"]
    page = index.read_text(encoding="utf-8")
    assert len(_table_rows(page)) == 4                       # the table still lists every tile
    assert _linked_images(page) == ["quality.png", f"tiles/{worst.name}.png"]
    # A second report with max_tiles=0 removes the stale figure.
    make_report(inp, out, rdir, max_tiles=0, recursive=False)
    assert list((rdir / "tiles").glob("*.png")) == []


def test_problems_are_named_and_exit_1(run, tmp_path, capsys):
    inp, out = _copy(run, tmp_path)
    (out / "a_field.npz").unlink()
    (out / "a_field.json").unlink()                          # missing output
    (out / "b_field.json").unlink()                          # killed between NPZ and JSON
    np.savez(out / "c_flat.npz", opt_v2=np.full((4, 32, 32), 1.5, np.float32))   # out of range
    np.savez(out / "stray.npz", opt_v2=np.zeros((4, 32, 32), np.float32))        # no input
    (out / "stray.json").write_text('{"stage": "stage2_refined"}')

    assert _report(inp, out) == 1
    stdout = capsys.readouterr().out
    assert "missing output: a_field" in stdout
    assert "incomplete output: b_field: NPZ without its JSON" in stdout
    assert "invalid output: c_flat: c_flat.npz: values in [1.5, 1.5], outside [0, 1]" in stdout
    assert "output without input: stray" in stdout
    assert stdout.rstrip().splitlines()[-1] == f"report: {(out / '_report' / 'index.html').resolve()}"
    page = (out / "_report" / "index.html").read_text(encoding="utf-8")
    assert "4 problem(s)" in page and "a_field" in page and "outside [0, 1]" in page
    assert len(_table_rows(page)) == 1                       # only the one valid output


def test_each_output_check(run, tmp_path):
    inp, out = _copy(run, tmp_path)
    v2 = read_opt_v2(out / "a_field.npz")
    np.savez(out / "a_field.npz", opt_v2=v2[:, :16])                              # wrong height
    np.savez(out / "b_field.npz", opt_v2=read_opt_v2(out / "b_field.npz").astype(np.float64))
    meta = json.loads((out / "c_flat.json").read_text())
    (out / "c_flat.json").write_text(json.dumps(meta).replace('"edge_preservation": null',
                                                              '"edge_preservation": NaN'))
    nan = read_opt_v2(out / "field&river's_01.npz")
    nan[0, 0, 0] = np.nan
    np.savez(out / "field&river's_01.npz", opt_v2=nan)
    chk = check_run(inp, out, out / "_report", recursive=False)
    got = {p.name: p.detail for p in chk.problems}
    assert got["a_field"] == "a_field.npz: opt_v2 is 16x32 px, the input is 32x32"
    assert got["b_field"] == "b_field.npz: opt_v2 is float64, expected float32"
    assert "c_flat.json is not valid JSON: NaN is not valid JSON" in got["c_flat"]
    assert got["field&river's_01"] == "field&river's_01.npz: 1 NaN/Inf values"
    assert chk.outputs == 0 and not chk.ok


def test_run_level_errors_exit_2(run, tmp_path, capsys):
    inp, out = run
    missing = tmp_path / "nope"
    assert _report(inp, missing) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"stage2 report: error: output_dir {missing} does not exist: pass output_dir=DIR of the Stage 2 run "
        "to report on"]
    assert report(compose_app("report", [f"output_dir={out}"])) == 2
    assert capsys.readouterr().err.splitlines() == [
        "stage2 report: error: input_dir is not set: pass input_dir=DIR (the Stage 1 tiles the run read)"]
    (tmp_path / "empty").mkdir()
    assert _report(tmp_path / "empty", out) == 2
    err = capsys.readouterr().err
    assert f"stage2 report: error: No tiles (*.npz, *.tif, *.tiff) found in {tmp_path / 'empty'}" in err
    assert _report(inp, out, max_tiles=-1, report_dir=tmp_path / "r") == 2
    assert capsys.readouterr().err.splitlines() == ["stage2 report: error: max_tiles=-1: pass 0 or more"]
    assert not missing.exists() and not (tmp_path / "r").exists()


def test_quality_false_run_and_failures(tmp_path, cfg_predict, capsys):
    """quality=false writes no metrics (the report computes them); a failed tile is reported with its reason."""
    inp, out = tmp_path / "in", tmp_path / "out"
    v1 = make_tile(inp / "good.npz", 32, 32, seed=5)
    bad = np.full((4, 32, 32), 0.2, np.float32)
    bad[1, 3, 3] = np.nan
    np.savez(inp / "bad.npz", opt_v1=bad)
    cfg_predict.quality = False
    assert predict(cfg_predict) == 1
    assert "quality" not in json.loads((out / "good.json").read_text())
    assert json.loads((out / "_stage2_summary.json").read_text())["quality"] is None
    capsys.readouterr()

    assert _report(inp, out) == 1
    assert "missing output: bad: the run failed this tile: 1 NaN and 0 Inf values" in capsys.readouterr().out
    q = tile_quality(v1, read_opt_v2(out / "good.npz"))
    page = (out / "_report" / "index.html").read_text(encoding="utf-8")
    (row,) = _table_rows(page)
    assert f"{q['ndvi_rmse']:.4f}*" in row and f"{q['edge_preservation']:.3f}*" in row
    assert "computed by the report" in page
    failures = page.split('id="failures"')[1].split('id="quality"')[0]
    assert "bad.npz" in failures and "1 NaN and 0 Inf values" in failures


# ---------------------------------------------------------------------------- in a real browser
def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _dump_dom(browser: str, page: Path, profile: Path) -> str:
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
                        page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_index_opens_from_the_file_system_in_chromium(run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the page is checked without a browser "
                    "by the other tests")
    inp, out = run
    rdir = tmp_path / "report"
    make_report(inp, out, rdir, max_tiles=3, recursive=False)
    n_img = 1 + 3 + 0                       # quality.png and three figures (the table only links)
    dom = _dump_dom(browser, rdir / "index.html", tmp_path / "profile")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-images="ok"' in body and f'data-images-loaded="{n_img}/{n_img}"' in body, body
    # The same page without one of its figures says so: the check above can fail.
    next((rdir / "tiles").glob("*.png")).unlink()
    dom = _dump_dom(browser, rdir / "index.html", tmp_path / "profile")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-images="broken"' in body and f'data-images-loaded="{n_img - 1}/{n_img}"' in body, body
    assert "image(s) did not load" in dom


def test_large_masked_tile_is_drawn_from_block_means_and_its_no_data_is_valid(tmp_path):
    """A 2500 x 1800 px output with a NaN swath edge (nan_policy=mask): the report accepts NaN exactly
    where the run says it masked, and draws the tile from 3 x 3 px means (no 2500 px arrays in matplotlib)."""
    from helpers import write_npz_output
    from stage2.report.figures import DISPLAY_MAX_SIDE, thumbnail

    inp, out = tmp_path / "in", tmp_path / "out"
    v1 = make_tile(inp / "scene.npz", 2500, 1800, seed=5)
    v1[:, :, :600] = np.nan
    np.savez(inp / "scene.npz", opt_v1=v1)
    v2 = np.clip(v1 * 1.01, 0, 1)
    meta = {"stage": "stage2_refined", "timestamp": "2026-01-01T00:00:00+00:00", "month": 6, "biome_code": 0,
            "processing": {"masked_pixels": 2500 * 600}, "quality": {"ndvi_rmse": 0.01, "edge_preservation": 0.99}}
    write_npz_output(out, "scene", v2, meta)
    chk, index, lines = make_report(inp, out, out / "_report", max_tiles=5, recursive=False)
    assert chk.problems == [] and chk.outputs == 1, lines
    w, h = _png_size(out / "_report" / "tiles" / "scene.png")
    assert w <= 2500 and h <= 1000

    small, f = thumbnail(v2)
    assert f == 3 and small.shape == (4, 833, 600) and max(small.shape[1:]) <= DISPLAY_MAX_SIDE
    assert np.isnan(small[:, :, :200]).all() and np.isfinite(small[:, :, 200:]).all()
    np.testing.assert_allclose(small[:, 10, 300], v2[:, 30:33, 900:903].mean(axis=(1, 2)), rtol=1e-6)

    # NaN where the run did not say it masked is still an invalid output
    meta["processing"]["masked_pixels"] = 2500 * 599
    write_npz_output(out, "scene", v2, meta)
    chk = check_run(inp, out, out / "_report", recursive=False)
    assert [p.detail for p in chk.problems] == [
        "scene.npz: NaN on 1500000 pixels (in some bands only: 0), but processing.masked_pixels is 1497500"]
