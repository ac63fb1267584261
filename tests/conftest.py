"""Shared fixtures: a tiny seeded checkpoint (built once per session), the real configs composed for
in-process runs (`cfg_predict`, `cfg_train`), and the clean-up that keeps in-process runs apart."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import compose_app

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


@pytest.fixture
def cfg_predict(tmp_path: Path, tiny_ckpt: Path) -> Any:
    """conf/predict.yaml as `python -m stage2.predict hardware=cpu precision=32 checkpoint=<tiny>
    input_dir=<tmp>/in output_dir=<tmp>/out` composes it, run dir <tmp>/run: `stage2.predict.app.run(cfg_predict)`
    runs it here. fp32 (not `auto`, which is bf16 on CPUs with native bf16) so values compare to 1e-5.

    Change a setting on the config (`cfg_predict.batch_size = 3`); for another profile or group, call
    helpers.compose_app("predict", [...]) instead.
    """
    return compose_app("predict", ["hardware=cpu", "precision=32"], tmp_path / "run", checkpoint=tiny_ckpt,
                       input_dir=tmp_path / "in", output_dir=tmp_path / "out")


@pytest.fixture
def cfg_train(tmp_path: Path) -> Iterator[Any]:
    """conf/train.yaml on the CPU, run dir <tmp>/run, sized to train in seconds: 32 px crops, batches of
    4, 8 crops an epoch, 2 epochs, no progress bar or model summary. Set optical_dir/pairs_dir on it.

    A run switches torch to deterministic algorithms (trainer.deterministic=warn); put that back after.
    """
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield compose_app("train", ["hardware=cpu", "precision=32", "data.crop=32", "data.batch_size=4",
                                "data.samples_per_epoch=8",
                                "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
                                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
                      tmp_path / "run")
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture(autouse=True)
def _forget_hydra_config() -> Iterator[None]:
    """No HydraConfig left over from an in-process run: the next test's apps must not see its run dir."""
    yield
    if "hydra.core.hydra_config" in sys.modules:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().cfg = None


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """For in-process runs that configure Hydra's job logging (stage2-infer): its file handler in the
    run dir and its console handler on the test's captured stderr must not outlive the test."""
    def ours(handlers: list[logging.Handler]) -> list[logging.Handler]:     # pytest manages its own
        return [h for h in handlers if not type(h).__module__.startswith("_pytest")]

    root = logging.getLogger()
    before, level = ours(root.handlers), root.level
    yield
    for h in ours(root.handlers):
        if h not in before:
            root.removeHandler(h)
            h.close()
    for h in before:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
