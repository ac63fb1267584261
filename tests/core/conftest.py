"""A real S3 API on 127.0.0.1 for the storage tests: moto in server mode, started by the tests themselves.

As s3fs's own test suite does: one ThreadedMotoServer per session on a free port, emptied before
each test; fake credentials in the environment and no user AWS config, so nothing reaches AWS.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest

BUCKET = "stage2-test"
SECRET = "fake-secret-Zq81xT"          # must never appear in a message


@dataclass
class S3:
    endpoint: str
    bucket: str
    secret: str

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"


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
    import os

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
