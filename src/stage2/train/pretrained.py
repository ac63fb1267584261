"""Start the refiner's encoder from Prithvi weights the user has on disk (never a download).

Prithvi checkpoints are pretrained on 6 HLS bands (terratorch's PRETRAINED_BANDS: blue, green,
red, narrow NIR, SWIR 1, SWIR 2); our tiles carry 4. terratorch's own
`checkpoint_filter_fn_vit` turns a PrithviMAE/PrithviViT state dict into encoder weights for
our model: it drops the MAE decoder, strips the `encoder.` prefix, keeps the model's fixed
positional embedding and picks the patch-embedding input channels of our 4 bands by name.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("stage2")


class PretrainedError(Exception):
    """The pretrained file cannot be used; the message names the file and says what to do."""


def _state_dict(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict of a checkpoint: a plain state dict, or one under 'state_dict' or 'model'."""
    if isinstance(raw, dict):
        for key in ("state_dict", "model"):
            inner = raw.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise PretrainedError(f"pretrained file {path} holds no state dict of tensors "
                          f"(found {type(raw).__name__}): pass a Prithvi .pt/.pth checkpoint")


def load_pretrained_encoder(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load Prithvi weights from `path` into `model.encoder` (a Stage2Refiner), for our 4 bands.

    Returns {"loaded": [...], "missing": [...], "unexpected": [...]} key lists. Raises
    PretrainedError when the file is missing, unsafe, or belongs to another architecture
    (shape mismatch, or none of its keys is an encoder key).
    """
    from terratorch.datasets import HLSBands
    from terratorch.models.backbones.prithvi_vit import PRETRAINED_BANDS, checkpoint_filter_fn_vit

    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedError(f"pretrained file {path} does not exist: set model.pretrained_path to a Prithvi "
                              "checkpoint on disk, or null to train from scratch (nothing is downloaded)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise PretrainedError(f"pretrained file {path} holds objects that safe loading refuses (not executed; "
                              f"{str(e).splitlines()[0][:160]}): save its state_dict with torch.save") from None
    except Exception as e:
        raise PretrainedError(f"pretrained file {path} is unreadable ({type(e).__name__}): "
                              "it is damaged or not a PyTorch file") from None
    state = _state_dict(raw, path)
    model_bands = [HLSBands.BLUE, HLSBands.GREEN, HLSBands.RED, HLSBands.NIR_NARROW]
    try:
        filtered = checkpoint_filter_fn_vit(dict(state), model.encoder, pretrained_bands=PRETRAINED_BANDS,
                                            model_bands=model_bands)
    except Exception as e:
        raise PretrainedError(f"pretrained file {path} is not a Prithvi checkpoint terratorch can read "
                              f"({type(e).__name__}: {e})") from None
    own = model.encoder.state_dict()
    matching = [k for k in filtered if k in own]
    if not matching:
        raise PretrainedError(f"pretrained file {path} has no keys of a Prithvi encoder (first keys: "
                              f"{sorted(state)[:5]}): pass a PrithviViT/PrithviMAE checkpoint")
    bad = [f"{k} {tuple(filtered[k].shape)} vs {tuple(own[k].shape)}" for k in matching
           if filtered[k].shape != own[k].shape]
    if bad:
        raise PretrainedError(f"pretrained file {path} is for another Prithvi size than model "
                              f"{model.config.get('backbone')!r} ({'; '.join(bad[:3])}): pick the matching model=...")
    result = model.encoder.load_state_dict(filtered, strict=False)
    report = {"loaded": matching, "missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
    log.info("loaded %d encoder tensors from %s (bands BLUE, GREEN, RED, NIR_NARROW of %d pretrained bands)",
             len(matching), path, len(PRETRAINED_BANDS))
    if report["missing"]:
        log.warning("pretrained file %s lacks %d encoder tensors (kept fresh): %s", path, len(report["missing"]),
                    report["missing"][:5])
    if report["unexpected"]:
        log.warning("pretrained file %s has %d tensors the encoder does not use: %s", path,
                    len(report["unexpected"]), report["unexpected"][:5])
    return report
