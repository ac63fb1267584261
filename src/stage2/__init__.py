"""stage2: Prithvi refinement of Stage 1 (opt_v1) tiles into opt_v2, with Lightning and Hydra.

Imports are lazy: `import stage2` costs milliseconds; torch is imported on first use of a
model function, terratorch only when a model is built.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# The package's Hydra configs (src/stage2/conf -> the repository's conf/): the one place every
# entry point and build_model read their defaults from.
CONF_DIR = Path(__file__).resolve().parent / "conf"

_EXPORTS = {
    "load_model": "stage2.checkpoint",
    "save_checkpoint": "stage2.checkpoint",
    "CheckpointError": "stage2.checkpoint",
    "build_model": "stage2.model",
    "Stage2Refiner": "stage2.model",
    "read_tile": "stage2.tiles",
    "read_output": "stage2.product",
    "Tile": "stage2.tiles",
    "TileError": "stage2.tiles",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stage2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
