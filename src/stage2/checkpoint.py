"""The Stage 2 checkpoint format (SPEC 6), its fingerprint and its safe loading.

A `.pt` file is a plain dict: {"stage2_checkpoint": FORMAT_VERSION, "model_config": {...},
"state_dict": {...}, "stage2_version": "...", "conditioning": {...}}; `conditioning`, the months and
biomes the model was trained on (SPEC 6), is absent from files written before it was recorded and
from models that never saw training (a model then runs on whatever month and biome it is given).
Everything is loaded with `torch.load(weights_only=True)`, which refuses any pickle that would run
code, and only Prithvi backbones of terratorch's own registry are built from a checkpoint's config
(SPEC 5). Lightning `.ckpt` files written by `stage2.train` carry the same marker, config and
conditioning record in `hyper_parameters`.

torch is imported inside the functions that load or save: the "nothing to do" path fingerprints
the checkpoint (hashlib) without it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runtime import atomic_write

if TYPE_CHECKING:
    import torch
    from torch import nn

MARKER = "stage2_checkpoint"
FORMAT_VERSION = 1
CONDITIONING_KEY = "conditioning"


class CheckpointError(Exception):
    """The checkpoint cannot be used; the message names the file and says what to do."""


def fingerprint(path: str | os.PathLike, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{"path", "size", "mtime_ns", "sha256"} of a checkpoint file: what outputs record to be trusted.

    Hashing reads the whole file: about 1.3 s for 1.3 GB here (SHA-NI, page cache warm). `known`,
    the record of an earlier run (its summary keeps one), is reused when the resolved path, size
    and mtime still match, so a finished AOI's rerun does not read the checkpoint at all.
    """
    path = Path(path).resolve()
    st = path.stat()
    record = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if known and all(known.get(k) == v for k, v in record.items()) and isinstance(known.get("sha256"), str):
        return {**record, "sha256": known["sha256"]}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return {**record, "sha256": h.hexdigest()}


def conditioning_record(months: Iterable[int], biomes: Iterable[int], *, month_dropout: float,
                        biome_dropout: float) -> dict[str, Any]:
    """What a checkpoint records of its training conditions: the months (1-12) and biomes (0-15) of
    its training tiles, and how often each was replaced by the learned "unknown" (month 0, biome 0)."""
    return {"months": sorted({int(m) for m in months}), "biomes": sorted({int(b) for b in biomes}),
            "month_dropout": float(month_dropout), "biome_dropout": float(biome_dropout)}


def checked_conditioning(value: Any, path: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint's conditioning record (None where it has none); CheckpointError if it is malformed."""
    if value is None:
        return None
    try:
        months, biomes = list(value["months"]), list(value["biomes"])
        ok = all(isinstance(m, int) and 1 <= m <= 12 for m in months) and \
            all(isinstance(b, int) and 0 <= b <= 15 for b in biomes)
        record = conditioning_record(months, biomes, month_dropout=value.get("month_dropout", 0.0),
                                     biome_dropout=value.get("biome_dropout", 0.0))
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint {path} has a damaged '{CONDITIONING_KEY}' record (months 1-12 and "
                              "biomes 0-15 expected): re-save it with stage2.save_checkpoint")
    return record


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write model config, weights, the Stage 2 marker and the model's `conditioning` record (where it
    has one) to `path` (atomically)."""
    import torch

    from . import __version__

    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError("save_checkpoint expects a Stage2Refiner (a module with a .config dict)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        MARKER: FORMAT_VERSION,
        "stage2_version": __version__,
        "model_config": dict(config),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    record = getattr(model, "conditioning", None)
    if record is not None:
        payload[CONDITIONING_KEY] = checked_conditioning(record, path)
    return atomic_write(path, lambda f: torch.save(payload, f))


def _read(path: Path) -> Any:
    import torch

    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path (checkpoint=...)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file: point checkpoint= at a .pt or .ckpt file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {path} is not readable: check its permissions")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "GLOBAL" in ln),
                      str(e).splitlines()[0] if str(e) else "")
        raise CheckpointError(
            f"checkpoint {path} is not a safe Stage 2 checkpoint: weights-only loading refused it "
            f"({detail[:160]}); it is damaged, not a PyTorch file, or a pickle that could run code "
            "(nothing in it was executed). Use a checkpoint written by stage2.save_checkpoint") from None
    except Exception as e:  # noqa: BLE001 - a damaged file can make the unpickler raise almost anything
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {_first_line(e)}): "
            "it is damaged or not a PyTorch file; copy it again or re-save it with stage2.save_checkpoint") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:160] if str(e) else "empty"


def _unpack(raw: Any, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model_config, state_dict) from a Stage 2 .pt or a stage2.train Lightning .ckpt."""
    if isinstance(raw, dict) and raw.get(MARKER) is not None and "state_dict" in raw:
        if raw.get(MARKER) != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has Stage 2 format {raw.get(MARKER)!r}, this stage2 "
                                  f"reads format {FORMAT_VERSION}: upgrade stage2")
        if not isinstance(raw.get("model_config"), dict) or not isinstance(raw["state_dict"], dict):
            raise CheckpointError(f"checkpoint {path} is a damaged Stage 2 checkpoint (no model_config or "
                                  "state_dict): re-save it with stage2.save_checkpoint")
        return dict(raw["model_config"]), raw["state_dict"]
    hp = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    if isinstance(hp, dict) and hp.get(MARKER) is not None and isinstance(raw.get("state_dict"), dict) \
            and isinstance(hp.get("model_config"), dict):
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
        return dict(hp["model_config"]), state
    keys = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
    raise CheckpointError(f"checkpoint {path} is not a Stage 2 checkpoint (no '{MARKER}' marker; found {keys}): "
                          "it may be a Stage 1 or Stage 3 model; pass the Stage 2 refiner checkpoint")


def read_checked(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """(model_config, state_dict, raw) of a Stage 2 checkpoint, safely read; CheckpointError otherwise."""
    path = Path(path)
    raw = _read(path)
    config, state = _unpack(raw, path)
    return config, state, raw


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the architecture recorded in the checkpoint, load its weights, eval mode, on `device`."""
    import torch

    from .model import Stage2Refiner, check_backbone, model_config

    path = Path(path)
    config, state, raw = read_checked(path)
    record = checked_conditioning(conditioning_of(raw), path)
    try:
        check_backbone(config.get("backbone"))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} is not a safe Stage 2 checkpoint: {e}; nothing was built or "
                              "downloaded. Use a checkpoint of stage2.save_checkpoint or stage2.train") from None
    try:
        # Built on the meta device: no memory and no random init for weights that are replaced anyway
        # (saves about a second for prithvi_eo_v1_100); load_state_dict(assign=True) materialises them.
        with torch.device("meta"):
            model = Stage2Refiner(**model_config(config))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} describes a model that cannot be built ({e}): "
                              "it was written by another stage2 version or edited") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = "; ".join(str(e).splitlines()[1:3]).strip()[:300]
        raise CheckpointError(f"checkpoint {path} weights do not match its architecture "
                              f"{config.get('name')!r} ({first}): the file is corrupt or edited") from None
    model.conditioning = record
    return model.to(device).eval()


def conditioning_of(raw: Any) -> Any:
    """The raw conditioning record of a .pt (top level) or a stage2.train .ckpt (hyper_parameters)."""
    if not isinstance(raw, dict):
        return None
    if CONDITIONING_KEY in raw:
        return raw[CONDITIONING_KEY]
    hp = raw.get("hyper_parameters")
    return hp.get(CONDITIONING_KEY) if isinstance(hp, dict) else None
