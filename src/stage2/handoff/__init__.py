"""The hand-off: the files that let Stage 3 (TerraTorch), a GIS and a STAC client read an output folder as it is.

`rebuild(folder)` writes, from the folder's valid outputs (this run's and earlier runs', any stage2
version), each as a whole object:
- `_stage2_tiles.txt`: the names of the images Stage 3 reads, one per line, sorted (TerraTorch's split format);
- `_stage2_terratorch.yaml`: a GenericNonGeoSegmentationDataModule over the refined COGs;
- `_stage2_stac/`: a self-contained STAC 1.1 Collection with one Item per output;
and returns the folder's exact band statistics (HandoffResult.band_stats). predict calls it at the
end of a run; `python -m stage2.catalog output_dir=...` calls it for any folder. No torch: numpy,
the standard library, and rasterio where footprints are reprojected or old outputs' rasters read.
The guide for Stage 3 engineers: docs/stage3.md.
"""

from __future__ import annotations

from .build import HandoffResult, rebuild
from .layout import COLLECTION_KEY, STAC_DIR, TERRATORCH_FILE, TILES_FILE, item_key
from .stats import aggregate_band_stats

__all__ = ["COLLECTION_KEY", "STAC_DIR", "TERRATORCH_FILE", "TILES_FILE", "HandoffResult", "aggregate_band_stats",
           "item_key", "rebuild"]
