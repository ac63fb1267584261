"""`_stage2_terratorch.yaml`: a TerraTorch GenericNonGeoSegmentationDataModule that reads the refined COGs.

How TerraTorch (1.2) finds images: `glob(<data_root>/<img_grep>)` in one folder, then, when a split
file is given, keeps the files whose base name without its extension is one of the split file's lines
(lines stripped, their own extension dropped too; `allow_substring_split_file: false` makes it an
exact match rather than a substring test). Label files are matched the same way and paired with the
images in sorted order. Hence:
- `img_grep: "*.tif"` and the tile list as split file pick exactly the refined images `<name>.tif`:
  a tile's `<name>.std.tif` (its spread) has the base name `<name>.std`, which no line names;
- a name with a `.` (`a.b`) cannot be matched (TerraTorch drops `.b` from the line as an extension),
  and a name in a sub-folder (`sub/a`) is not in the data root's glob: such outputs stay in the tile
  list and the catalog, and the file says how many TerraTorch cannot reach;
- TerraTorch reads local files only (glob, rasterio): for a folder in a bucket the roots are its URL
  and the file says to copy or mount the folder first.
NaN (no data) is replaced by `no_data_replace` before normalisation, so no NaN reaches the loss.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..tiles import BANDS

CLASS_PATH = "terratorch.datamodules.GenericNonGeoSegmentationDataModule"
IMG_GREP = "*.tif"
HLS_BANDS = ("BLUE", "GREEN", "RED", "NIR_NARROW")      # terratorch.datasets.HLSBands of B02, B03, B04, B08
RGB_INDICES = (2, 1, 0)                                 # B04, B03, B02
NO_DATA_REPLACE = 0.0       # reflectance 0 (then normalised like any pixel): finite, and far from most land
NO_LABEL_REPLACE = -1       # a task's ignore_index: unlabelled pixels add nothing to the loss
NUM_WORKERS = 4


def reachable(name: str) -> bool:
    """Whether TerraTorch's generic dataset can find the output `name` from this file (see the module docstring)."""
    return "/" not in name and "." not in name and name == name.strip()


def datamodule_yaml(*, root: str, tiles_uri: str, tiles: Sequence[str], stats: dict[str, dict[str, Any]],
                    predict_exact: bool, remote: bool, shapes: set[tuple[int, int]]) -> str:
    """The YAML text: `class_path` + `init_args`, with comments for what the Stage 3 engineer adds.

    `root`: the output folder (absolute path or URL); `tiles_uri`: the tile list there; `tiles`: the
    names it lists; `stats`: their aggregate band statistics; `predict_exact`: whether `img_grep` alone
    matches exactly these images in `root` (TerraTorch's predict reads no split file); `shapes`: the
    (H, W) of the listed images.
    """
    means = [_number(stats[b]["mean"], 0.0) for b in BANDS]
    stds = [_number(stats[b]["std"], 1.0) or 1.0 for b in BANDS]      # a constant band: no division by 0
    r, t = json.dumps(root), json.dumps(tiles_uri)
    lines = [
        "# TerraTorch datamodule for this folder's refined images (written by stage2 from the folder's valid",
        "# outputs at the end of every run: copy it before you edit it). Use it as the `data:` section of a",
        "# TerraTorch/LightningCLI config, or as a file: terratorch fit --config task.yaml --data THIS_FILE",
        "# Guide: docs/stage3.md in the stage2 repository.",
        *_warnings(tiles, remote),
        f"class_path: {CLASS_PATH}",
        "init_args:",
        "  # images: <name>.tif (float32 reflectance in [0, 1], bands B02, B03, B04, B08, NaN = no data)",
        f"  train_data_root: {r}",
        f"  val_data_root: {r}",
        f"  test_data_root: {r}",
        *_predict_root(r, predict_exact),
        f"  img_grep: {json.dumps(IMG_GREP)}",
        f"  # the {len(tiles)} refined images, one name per line: split it into train/val/test lists of your own",
        f"  train_split: {t}",
        f"  val_split: {t}",
        f"  test_split: {t}",
        "  ignore_split_file_extensions: true",
        "  allow_substring_split_file: false   # exact names: `a` must not also pick a.std.tif or a2.tif",
        f"  dataset_bands: [{', '.join(HLS_BANDS)}]   # B02, B03, B04, B08",
        f"  output_bands: [{', '.join(HLS_BANDS)}]",
        f"  rgb_indices: [{', '.join(map(str, RGB_INDICES))}]",
        "  constant_scale: 1.0",
        f"  # per band over the valid pixels of the {len(tiles)} images (reflectance, as the COGs store it)",
        f"  means: {json.dumps(means)}",
        f"  stds: {json.dumps(stds)}",
        f"  no_data_replace: {NO_DATA_REPLACE}   # NaN (no data) -> 0 before normalisation: no NaN reaches the loss",
        f"  no_label_replace: {NO_LABEL_REPLACE}   # NaN in a label -> -1: give your task ignore_index: -1",
        f"  num_workers: {NUM_WORKERS}",
        *_shape_note(shapes),
        "  # --- Stage 3 adds (docs/stage3.md) ---",
        "  # num_classes: 10",
        "  # batch_size: 8",
        "  # train_label_data_root: /path/to/labels   # one label raster per image, named <name>.tif like it",
        "  # val_label_data_root: /path/to/labels",
        "  # test_label_data_root: /path/to/labels",
        '  # label_grep: "*.tif"',
    ]
    return "\n".join(lines) + "\n"


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) else default


def _warnings(tiles: Sequence[str], remote: bool) -> list[str]:
    out = []
    if remote:
        out += ["# This folder is in an object store: TerraTorch reads local files only (glob, then rasterio).",
                "# Copy or mount it first (e.g. `aws s3 sync URL DIR`, rclone mount) and put that folder in",
                "# place of the URL below."]
    lost = [n for n in tiles if not reachable(n)]
    if lost:
        out += [f"# {len(lost)} of the {len(tiles)} listed images have a name TerraTorch's split file cannot match",
                f"# (a sub-folder or a `.` in the name, e.g. {lost[0]!r}): rename those tiles in Stage 1 to use them."]
    return out


def _predict_root(root: str, exact: bool) -> list[str]:
    if exact:
        return [f"  predict_data_root: {root}"]
    return ["  # predict reads every img_grep match (no split file), and this folder has other .tif files",
            "  # (e.g. <name>.std.tif): point predict_data_root at a folder of the images alone",
            f"  # predict_data_root: {root}"]


def _shape_note(shapes: set[tuple[int, int]]) -> list[str]:
    if len(shapes) <= 1:
        return []
    small = min(min(s) for s in shapes)
    return [f"  # the images differ in size ({len(shapes)} shapes, smallest side {small} px): batches need one",
            "  # size: add train_transform/val_transform/test_transform with albumentations.RandomCrop +",
            "  # ToTensorV2, or use batch_size 1"]
