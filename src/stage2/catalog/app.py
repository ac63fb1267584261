"""`python -m stage2.catalog output_dir=DIR_OR_URL [input_dir=DIR_OR_URL]` (settings: conf/catalog.yaml).

Rebuilds the hand-off files of a Stage 2 output folder or bucket prefix from its valid outputs, as a
predict run does at its end (stage2.handoff.rebuild): `_stage2_tiles.txt`, `_stage2_terratorch.yaml`
and the STAC catalog `_stage2_stac/`. No model, no checkpoint, no torch: for folders written by an
earlier stage2 (their outputs' missing keys are derived from their rasters), after outputs were
deleted or moved in, or to repair the files after an interrupted run. The guide: docs/stage3.md.

Prints what it found and wrote. Exit 0; 1 when some Stage 2 JSONs are not trusted (a data file
missing or empty: each is named, and left out of every file); 2 with one line naming the folder and
the fix when the folder is missing, holds no Stage 2 outputs, or cannot be written.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from .. import CONF_DIR
from ..handoff import COLLECTION_KEY, rebuild
from ..runtime import EXIT_OK, EXIT_TILES_FAILED, RunError, exit_with, guarded, register_resolvers
from ..store import Store, location, open_store, safe_url

register_resolvers()      # catalog.yaml's ${stage2_aoi_dir:...}

PROG = "stage2 catalog"


def open_output_dir(value: object) -> Store:
    """The output folder as a store; RunError when it is not set, missing or holds no output JSON."""
    if value in (None, ""):
        raise RunError("output_dir is not set: pass output_dir=DIR (the folder or bucket prefix stage2.predict "
                       "wrote, or aoi=NAME)")
    where = location(value)
    store = open_store(where)
    shown = safe_url(store.url)
    if store.local and not store.root.is_dir():
        what = "does not exist" if not store.root.exists() else "is not a directory"
        raise RunError(f"output_dir {shown} {what}: pass the output_dir of a Stage 2 run")
    if not any(key.endswith(".json") and not key.rsplit("/", 1)[-1].startswith("_stage2_")
               for key in store.listing(recursive=True) if not key.startswith("_stage2_stac/")):
        raise RunError(f"No Stage 2 outputs (<name>.json) in {shown}: point output_dir at the folder "
                       "stage2.predict wrote its outputs to")
    return store


def run(cfg: DictConfig) -> int:
    """One rebuild; returns the exit code (0 all good, 1 some outputs not trusted, 2 run-level error)."""
    def steps() -> int:
        store = open_output_dir(cfg.output_dir)
        input_dir = None if cfg.get("input_dir") in (None, "") else str(cfg.input_dir)
        try:
            result = rebuild(store, input_dir=input_dir)
        except PermissionError as e:
            raise RunError(f"output_dir {safe_url(store.url)} cannot be written ({e.strerror}): make it "
                           "writable, or copy the folder somewhere writable and run there") from None
        print(f"{PROG}: {safe_url(store.url)}")
        print("\n".join(f"  {line}" for line in result.lines()))
        print(f"catalog: {store.uri(COLLECTION_KEY)}", flush=True)
        return EXIT_TILES_FAILED if result.skipped else EXIT_OK

    return guarded(steps, cfg, prog=PROG)


# An absolute config path: works for `python -m`, console scripts and `from stage2.catalog.app import main`.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="catalog")
def main(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    code = run(cfg)
    return code if HydraConfig.get().mode == RunMode.MULTIRUN else exit_with(code)
