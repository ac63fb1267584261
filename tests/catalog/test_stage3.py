"""Stage 3 reads a real run's outputs as they are: odc-stac loads the catalog's items onto their grid, and
TerraTorch trains a small Prithvi segmentation model from `_stage2_terratorch.yaml` alone (plus label
rasters), with a tile whose no-data strip never turns into a NaN loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio

from handoff_helpers import CRS, offline_stac_validation, transform_at
from helpers import compose_app, make_tile
from stage2.handoff import COLLECTION_KEY, TERRATORCH_FILE, TILES_FILE, rebuild

# slow: a predict run per test; library notices about Affine's `*` are not ours
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")]
NAN_ROWS = 8


@pytest.fixture(scope="module")
def run_outputs(tmp_path_factory, tiny_ckpt) -> Path:
    """A real predict run (tiny seeded checkpoint, fp32, CPU) over three georeferenced 64 px tiles, one with
    a strip of no data (NaN, nan_policy=mask), written as COGs, with the hand-off files its end writes.
    Once for the module: the tests only read it."""
    from stage2.predict.app import run

    tmp = tmp_path_factory.mktemp("stage3")
    inp, out = tmp / "in", tmp / "out"
    for i, name in enumerate(("t0", "t1", "t2")):
        meta = {"month": 6, "biome_code": 4, "tile_id": name, "acquired": f"2021-07-0{i + 1}T10:00:00Z",
                "crs": CRS, "transform": transform_at(64 * i, 0)}
        arr = make_tile(inp / f"{name}.npz", h=64, w=64, seed=i, meta=meta)
        if name == "t1":
            arr[:, :NAN_ROWS] = np.nan
            np.savez(inp / f"{name}.npz", opt_v1=arr)
    cfg = compose_app("predict", ["hardware=cpu", "precision=32"], tmp / "run", checkpoint=tiny_ckpt,
                      input_dir=inp, output_dir=out, output_format="cog", nan_policy="mask", batch_size=3)
    assert run(cfg) == 0
    assert (out / TILES_FILE).is_file() and (out / COLLECTION_KEY).is_file()     # the run's end wrote them
    return out


def _cog(path: Path) -> tuple[np.ndarray, rasterio.Affine]:
    with rasterio.open(path) as ds:
        return ds.read(), ds.transform


def test_odc_stac_loads_the_refined_values_on_their_grid(run_outputs):
    import odc.stac
    import pystac

    with offline_stac_validation():
        collection = pystac.Collection.from_file(str(run_outputs / COLLECTION_KEY))
        assert collection.validate_all() == 3
    items = sorted(collection.get_items(), key=lambda it: it.id)
    for item in items:
        data = odc.stac.load([item], bands=["B02", "B03", "B04", "B08"], chunks=None)
        values, transform = _cog(run_outputs / f"{item.id}.tif")
        assert data.odc.geobox.crs == CRS and tuple(data.odc.geobox.affine)[:6] == tuple(transform)[:6]
        loaded = np.stack([data[b].values[0] for b in ("B02", "B03", "B04", "B08")])
        np.testing.assert_array_equal(loaded, values)
        assert str(data.time.values[0]).startswith(item.properties["datetime"].rstrip("Z"))
    strip = odc.stac.load([items[1]], bands=["B04"], chunks=None)["B04"].values[0]
    assert np.isnan(strip[:NAN_ROWS]).all() and np.isfinite(strip[NAN_ROWS:]).all()

    mosaic = odc.stac.load(items, bands=["B08"], chunks=None, groupby="solar_day")    # the three tiles side by side
    assert mosaic["B08"].shape[1:] == (64, 192)


def test_the_tile_list_and_the_statistics_match_the_run(run_outputs):
    arrays = [_cog(run_outputs / f"t{i}.tif")[0] for i in range(3)]
    assert (run_outputs / TILES_FILE).read_text() == "t0\nt1\nt2\n"
    meta = [json.loads((run_outputs / f"t{i}.json").read_text()) for i in range(3)]
    assert all("acquired" in m for m in meta)
    result = rebuild(run_outputs)
    for b, band in enumerate(("B02", "B03", "B04", "B08")):
        values = np.concatenate([a[b].ravel() for a in arrays]).astype(np.float64)
        values = values[~np.isnan(values)]
        assert result.band_stats[band]["count"] == values.size == 3 * 64 * 64 - NAN_ROWS * 64
        assert math.isclose(result.band_stats[band]["mean"], values.mean(), rel_tol=1e-7)
        assert math.isclose(result.band_stats[band]["std"], values.std(), rel_tol=1e-6)


def _datamodule(out: Path, labels: Path, **changes):
    """The datamodule as TerraTorch's CLI builds it (`terratorch fit --data _stage2_terratorch.yaml ...`):
    jsonargparse reads the file and the engineer's additions, and instantiates the class it names."""
    import terratorch.datamodules  # noqa: F401  (registers the class path)
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    # batch_size 3: every batch holds the tile with the no-data strip
    extra = {"num_classes": 2, "batch_size": 3, "num_workers": 0, "train_label_data_root": str(labels),
             "val_label_data_root": str(labels), "label_grep": "*.tif", **changes}
    args = ["--data", str(out / TERRATORCH_FILE)] + [f"--data.init_args.{k}={v}" for k, v in extra.items()]
    return parser.instantiate(parser.parse_args(args)).data


def _labels(out: Path, tmp_path: Path) -> Path:
    """Two-class label rasters named like the images (<name>.tif), NaN (unlabelled) where the image has no data."""
    labels = tmp_path / "labels"
    labels.mkdir()
    for name in (out / TILES_FILE).read_text().split():
        image, _ = _cog(out / f"{name}.tif")
        label = (image[3] > np.nanmedian(image[3])).astype(np.float32)[None]
        label[:, np.isnan(image[3])] = np.nan
        with rasterio.open(labels / f"{name}.tif", "w", driver="GTiff", width=64, height=64, count=1,
                           dtype="float32") as ds:
            ds.write(label)
    return labels


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")      # the label rasters
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")                                  # Lightning's own notice
def test_terratorch_trains_from_the_written_datamodule_with_a_finite_loss(run_outputs, tmp_path):
    import torch
    from lightning import Trainer, seed_everything
    from lightning.pytorch.callbacks import Callback
    from terratorch.tasks import SemanticSegmentationTask

    labels = _labels(run_outputs, tmp_path)
    dm = _datamodule(run_outputs, labels)
    dm.setup("fit")
    assert [Path(f).name for f in dm.train_dataset.image_files] == ["t0.tif", "t1.tif", "t2.tif"]
    sample = dm.train_dataset[1]                                       # the tile with the no-data strip
    assert torch.isfinite(sample["image"]).all() and (sample["mask"][:NAN_ROWS] == -1).all()
    bare = _datamodule(run_outputs, labels, no_data_replace="null")     # the check can fail: without the
    bare.setup("fit")                                                  # replacement, NaN reaches the model
    assert torch.isnan(bare.train_dataset[1]["image"]).any()

    seed_everything(0)
    task = SemanticSegmentationTask(
        model_factory="EncoderDecoderFactory",
        model_args={"backbone": "prithvi_eo_tiny", "backbone_pretrained": False,
                    "backbone_bands": ["BLUE", "GREEN", "RED", "NIR_NARROW"],
                    "necks": [{"name": "SelectIndices", "indices": [-1]}, {"name": "ReshapeTokensToImage"}],
                    "decoder": "FCNDecoder", "decoder_channels": 16, "num_classes": 2},
        loss="ce", ignore_index=-1, freeze_backbone=False)
    losses: list[float] = []

    class KeepLoss(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[KeepLoss()], default_root_dir=tmp_path)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
