"""Shared fixtures: a tiny seeded checkpoint (built once per session), the real configs composed for
in-process runs (`cfg_predict`, `cfg_train`), the clean-up that keeps in-process runs apart, and a real
S3 API on 127.0.0.1 (`s3`: moto in server mode) for the bucket tests."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------- a real S3 API on 127.0.0.1
# moto in server mode, as s3fs's own test suite does: one ThreadedMotoServer per session on a free port,
# emptied before each test; fake credentials in the environment and no user AWS config, so nothing
# reaches AWS. Subprocesses inherit the environment (AWS_ENDPOINT_URL) and reach the same server.

BUCKET = "stage2-test"
SECRET = "fake-secret-Zq81xT"          # must never appear in a message


@dataclass
class S3:
    endpoint: str
    bucket: str
    secret: str

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def upload(self, folder: Path, prefix: str) -> str:
        """Copy the files of a local folder under `prefix`; return the prefix's URL."""
        from stage2.store import open_store

        bucket = open_store(self.url(prefix))
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                bucket.write_bytes(f.relative_to(folder).as_posix(), f.read_bytes())
        return bucket.url


@pytest.fixture(scope="session")
def s3_endpoint():
    server_mod = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """An empty bucket on the local server, reachable through s3fs with fake credentials from the environment."""
    import requests
    import s3fs

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")   # no 1 s wait for an instance-metadata service
    requests.post(f"{s3_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    s3fs.S3FileSystem.clear_instance_cache()                  # a new environment needs a new client
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield S3(s3_endpoint, BUCKET, SECRET)
    s3fs.S3FileSystem.clear_instance_cache()
