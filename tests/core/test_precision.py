"""precision=auto (SPEC 4): bf16 autocast on CPUs that compute bf16 natively, exact fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from stage2 import runtime


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert runtime.cpu_has_native_bf16() is (avx512_bf16 or amx)
    assert runtime.resolve_precision("auto", on_gpu=False, profile_amp="32-true") == expected
    # an explicit precision is never changed by the detector: 32 stays exact fp32
    assert runtime.resolve_precision("32", on_gpu=False, profile_amp="32-true") == "32-true"
    assert runtime.resolve_precision("bf16", on_gpu=False, profile_amp="32-true") == "bf16-mixed"


def test_detector_without_the_torch_probe_means_fp32(monkeypatch):
    """An older torch without torch.cpu's probes: no native bf16 is assumed (fp32 is always safe)."""
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert runtime.resolve_precision("auto", on_gpu=False, profile_amp="16-mixed") == "32-true"
