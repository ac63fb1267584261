"""`python -m stage2.catalog output_dir=...`: the hand-off files rebuilt for any output folder or bucket prefix,
without a model, with one line and exit 2 for a folder it cannot use."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from handoff_helpers import meta_of, refined, transform_at, write_legacy_output, write_output
from helpers import compose_app, run_cli
from stage2.catalog.app import main, run
from stage2.handoff import COLLECTION_KEY, TERRATORCH_FILE, TILES_FILE, item_key

# In-process runs of the Hydra app add console handlers bound to the test's captured stderr.
pytestmark = pytest.mark.usefixtures("restore_root_logger")


def _catalog(tmp_path: Path, capsys, **values) -> tuple[int, str, str]:
    code = run(compose_app("catalog", run_dir=tmp_path / "run", **values))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """A folder written by two stage2 versions: one output of this one, one of an earlier one."""
    out = tmp_path / "out"
    write_output(out, "new", refined(0), meta_of("new", transform=transform_at(0, 0)))
    write_legacy_output(out, "old", refined(1), meta_of("old", transform=transform_at(64, 0)), "cog")
    return out


def test_it_rebuilds_every_handoff_file_and_says_what_it_wrote(tmp_path, outputs, capsys):
    code, out, err = _catalog(tmp_path, capsys, output_dir=outputs, input_dir="/data/stage1")

    assert code == 0, err
    assert (outputs / TILES_FILE).read_text() == "new\nold\n"
    assert (outputs / TERRATORCH_FILE).is_file() and (outputs / item_key("old")).is_file()
    lines = out.splitlines()
    assert lines[0] == f"stage2 catalog: {outputs}"
    assert "outputs 2 valid (2 georeferenced, 1 of an earlier version completed from their rasters)" in out
    assert "tile list _stage2_tiles.txt: 2 images" in out
    assert lines[-1] == f"catalog: {outputs / COLLECTION_KEY}"
    collection = json.loads((outputs / COLLECTION_KEY).read_text())
    assert {"rel": "derived_from", "href": "/data/stage1", "title": "Stage 1 tiles (opt_v1)"} in collection["links"]


def test_untrusted_outputs_are_named_and_exit_1(tmp_path, outputs, capsys):
    (outputs / "old.tif").write_bytes(b"")
    code, out, _ = _catalog(tmp_path, capsys, output_dir=outputs)
    assert code == 1
    assert "skipped old: its data file old.tif is empty (0 bytes)" in out
    assert (outputs / TILES_FILE).read_text() == "new\n"


@pytest.mark.parametrize("where, words", [
    ("missing", "output_dir {path} does not exist: pass the output_dir of a Stage 2 run"),
    ("empty", "No Stage 2 outputs (<name>.json) in {path}: point output_dir at the folder"),
    (None, "output_dir is not set: pass output_dir=DIR"),
])
def test_a_folder_it_cannot_use_is_one_line_and_exit_2(tmp_path, capsys, where, words):
    path = tmp_path / str(where)
    if where == "empty":
        path.mkdir()
        (path / "_stage2_summary.json").write_text("{}")
    code, out, err = _catalog(tmp_path, capsys, output_dir=path if where else None)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"stage2 catalog: error: {words.format(path=path)}")
    if where == "empty":
        assert sorted(p.name for p in path.iterdir()) == ["_stage2_summary.json"]     # nothing written


def test_it_answers_help_and_cfg_job(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["stage2.catalog", "--help"])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "python -m stage2.catalog output_dir=DIR_OR_URL" in out
    monkeypatch.setattr(sys, "argv", ["stage2.catalog", "--cfg", "job"])
    main()
    assert "verbose: false" in capsys.readouterr().out.splitlines()


def test_python_m_stage2_catalog_runs_from_any_folder(tmp_path, outputs):
    r = run_cli([f"output_dir={outputs}"], cwd=tmp_path, module="stage2.catalog", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"catalog: {outputs / COLLECTION_KEY}"
    assert not (tmp_path / "outputs").exists()                   # no Hydra run folder where it was started


def test_a_bucket_prefix_gets_its_files_as_whole_objects_and_unchanged_items_are_not_uploaded(
        tmp_path, outputs, s3, capsys):
    from stage2.store import open_store

    url = s3.upload(outputs, "runs/aoi")
    code, out, err = _catalog(tmp_path, capsys, output_dir=url)
    assert code == 0, err
    bucket = open_store(url)
    assert bucket.read_bytes(TILES_FILE) == b"new\nold\n"
    text = bucket.read_bytes(TERRATORCH_FILE).decode()
    assert f'train_data_root: "{url}"' in text and "TerraTorch reads local files only" in text
    item = json.loads(bucket.read_bytes(item_key("new")))
    assert item["assets"]["opt_v2"]["href"] == "../../new.tif" and item["properties"]["proj:code"] == "EPSG:32633"
    assert s3.secret not in out + err

    from stage2.handoff import rebuild

    again = rebuild(url)
    assert again.unchanged == 2 and not any(k.startswith("_stage2_stac/items/") for k in again.written)
