"""Shared fixtures: a tiny seeded checkpoint (built once per session) and tile generators."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model():
    import torch

    import stage2

    torch.manual_seed(0)
    model = stage2.build_model("prithvi_eo_tiny")
    # Untrained decoders start near identity; perturb every weight so outputs really depend on them.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model, tmp_path_factory) -> Path:
    import stage2

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    stage2.save_checkpoint(tiny_model, path)
    return path
