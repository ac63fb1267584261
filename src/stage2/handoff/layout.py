"""Where the hand-off files live in an output folder, and how one of them names another.

Every hand-off file starts with the run's reserved prefix (`_stage2_`), so it is never mistaken for
an output, and a tile can never be named so (its output would overwrite them).
"""

from __future__ import annotations

from functools import lru_cache

from ..store import RESERVED_PREFIX

TILES_FILE = f"{RESERVED_PREFIX}tiles.txt"              # one output name per line: TerraTorch's split format
TERRATORCH_FILE = f"{RESERVED_PREFIX}terratorch.yaml"    # a GenericNonGeoSegmentationDataModule for the COGs
STAC_DIR = f"{RESERVED_PREFIX}stac"                      # a self-contained STAC Collection
COLLECTION_KEY = f"{STAC_DIR}/collection.json"
ITEMS_DIR = f"{STAC_DIR}/items"


def item_key(name: str) -> str:
    """The key of the STAC Item of the output `name` (names of sub-folder tiles keep their sub-folders)."""
    return f"{ITEMS_DIR}/{name}.json"


def is_handoff_key(key: str) -> bool:
    """Whether `key` is one of the hand-off files (never an output, never read as one)."""
    return key in (TILES_FILE, TERRATORCH_FILE) or key.startswith(f"{STAC_DIR}/")


def href(from_key: str, to_key: str) -> str:
    """A relative link from the document at `from_key` to the file at `to_key` (both keys of the folder),
    so the folder can be moved, copied or served as a whole and its catalog still resolves.

    Keys are clean relative paths ("a/b.json", no "." or ".."): the link is a string operation on
    their folders, remembered per pair of folders (an Item has four links, a catalog 10,000 Items).
    """
    from_dir, _, _ = from_key.rpartition("/")
    to_dir, _, base = to_key.rpartition("/")
    return _folder_link(from_dir, to_dir) + base


@lru_cache(maxsize=1024)
def _folder_link(from_dir: str, to_dir: str) -> str:
    """The relative path from the folder `from_dir` to the folder `to_dir`, ending in "/" ("./" for the same)."""
    here = from_dir.split("/") if from_dir else []
    there = to_dir.split("/") if to_dir else []
    common = 0
    while common < min(len(here), len(there)) and here[common] == there[common]:
        common += 1
    parts = [".."] * (len(here) - common) + there[common:]
    return "/".join(parts) + "/" if parts and parts[0] == ".." else "./" + "".join(p + "/" for p in parts)
