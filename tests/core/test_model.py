"""Stage2Refiner, the checkpoint format and batch independence (SPEC 6, 8)."""

import numpy as np
import pytest
import torch

import stage2
from stage2.predict.data import SizeBucketBatchSampler, bucket_key, collate
from stage2.tiles import Tile

SIZES = [(120, 120), (256, 256), (97, 133)]


def _module(model, streams: int):
    from stage2.predict.module import Stage2Module

    return Stage2Module(model, compile=False, cpu_streams=streams, tta="none", quality=True, pixel_stats="host")


def _tile(h, w, seed, month=6, biome=0):
    arr = np.random.default_rng(seed).random((4, h, w), dtype=np.float32)
    return Tile(name=f"t{seed}", path=None, array=arr, meta={}, month=month, biome=biome)


@pytest.mark.parametrize("h,w", SIZES)
def test_output_has_the_input_size_and_range(tiny_model, h, w):
    x = torch.rand(2, 4, h, w)
    with torch.inference_mode():
        y = tiny_model(x, torch.tensor([1, 12]), torch.tensor([0, 15]))
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    # the border is refined too: the last row/column differ from the input
    assert (y[..., -1, :] - x[..., -1, :]).abs().max() > 1e-4
    assert (y[..., :, -1] - x[..., :, -1]).abs().max() > 1e-4


def test_month_and_biome_change_the_output(tiny_model):
    x = torch.rand(1, 4, 64, 64)
    with torch.inference_mode():
        a = tiny_model(x, torch.tensor([1]), torch.tensor([0]))
        b = tiny_model(x, torch.tensor([7]), torch.tensor([0]))
        c = tiny_model(x, torch.tensor([1]), torch.tensor([9]))
    assert (a - b).abs().max() > 1e-5 and (a - c).abs().max() > 1e-5


def test_channels_last_decoder_equals_the_plain_nchw_formula(tiny_model):
    """The decoder's channels-last fast path computes clip(x + refine([shuffle(to_pixels(tokens)); xn]))."""
    m, p = tiny_model, tiny_model.patch_size
    b, h, w = 3, 128, 96
    x = torch.rand(b, 4, h, w)
    month, biome = torch.tensor([1, 6, 12]), torch.tensor([0, 7, 15])
    with torch.inference_mode():
        xn = (x - m.band_mean) / m.band_std
        feat = m.to_pixels(m.encode(xn, month, biome))
        feat = feat.view(b, h // p, w // p, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)
        expected = torch.clamp(x + m.refine(torch.cat((feat, xn), dim=1)), 0, 1)
        got = m.forward_padded(x, month, biome)
    assert got.is_contiguous() and got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-5
    assert (got - x).abs().max() > 1e-4   # the refinement is not a no-op


@pytest.mark.parametrize("h,w", SIZES)
def test_tile_in_a_mixed_batch_equals_the_tile_alone(tiny_model, h, w):
    """Pipeline path: bucket by padded size, collate 4 tiles, crop; equals model(tile) alone."""
    target = _tile(h, w, seed=1, month=3, biome=5)
    # neighbours: same padded size but other raw sizes, plus other sizes the sampler must keep apart
    hp, wp = h + (-h) % 16, w + (-w) % 16
    others = [_tile(hp - 2, wp - 1, 2), _tile(h, w, 3, 11, 2), _tile(64, 80, 4), _tile(hp - 15, wp - 15, 5)]
    tiles = [others[0], target, others[1], others[2], others[3]]
    keys = [bucket_key((4, *t.array.shape[1:]), 16) for t in tiles]
    batches = list(SizeBucketBatchSampler(keys, batch_size=4))
    (batch_idx,) = [b for b in batches if 1 in b]
    assert len(batch_idx) == 4 and 3 not in batch_idx   # the 64x80 tile is kept apart
    batch = collate([tiles[i] for i in batch_idx], 16)
    with torch.inference_mode():
        out = tiny_model.forward_padded(batch.x, batch.month, batch.biome)
        alone = tiny_model(torch.from_numpy(target.array)[None], torch.tensor([3]), torch.tensor([5]))[0]
    pos = batch_idx.index(1)
    got = out[pos, :, :h, :w]
    assert got.shape == alone.shape == (4, h, w)
    assert (got - alone).abs().max().item() <= 1e-5


def test_sampler_covers_every_index_once_across_ranks():
    keys = [(128, 128)] * 7 + [(256, 256)] * 5 + ["invalid"] * 2 + [(112, 144)] * 9
    seen = []
    for rank in range(3):
        for b in SizeBucketBatchSampler(keys, 4, rank, 3):
            assert len({keys[i] for i in b}) == 1
            seen.extend(b)
    assert sorted(seen) == list(range(len(keys)))


def test_checkpoint_round_trip(tiny_model, tiny_ckpt):
    loaded = stage2.load_model(tiny_ckpt)
    assert not loaded.training and loaded.config == tiny_model.config
    x = torch.rand(1, 4, 120, 120)
    with torch.inference_mode():
        month, biome = torch.tensor([6]), torch.tensor([0])
        assert torch.equal(loaded(x, month, biome), tiny_model(x, month, biome))
    raw = torch.load(tiny_ckpt, weights_only=True)
    assert raw["stage2_checkpoint"] == 1 and raw["model_config"]["backbone"] == "prithvi_eo_tiny"


def test_build_model_by_name_and_dict_without_download(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"build_model opened a network connection: {args}")

    # Not a check of HF_HUB_OFFLINE (the suite sets it itself): any attempt to connect fails this test.
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    cfg = {"name": "mine", "backbone": "prithvi_eo_tiny", "decoder_channels": 8, "refine_channels": 8,
           "n_months": 12, "n_biomes": 16}
    m = stage2.build_model(cfg)
    assert m.config["name"] == "mine" and m.patch_size == 16 and m.to_pixels.out_features == 8 * 16 * 16
    with pytest.raises(ValueError, match=r"missing keys \['n_months', 'n_biomes'\]"):
        stage2.build_model({k: v for k, v in cfg.items() if not k.startswith("n_")})
    with pytest.raises(ValueError, match="unknown model"):
        stage2.build_model("prithvi_nonexistent")


def _five_tile_batch(h=256, w=240):
    return collate([_tile(h, w, s, month=s % 12 + 1, biome=s) for s in range(5)], 16)


def test_cpu_streams_run_a_batch_as_concurrent_chunks_with_the_same_values(tiny_model, monkeypatch):
    """cpu_streams=2: the batch runs as two chunks on two threads with half the threads each; same outputs."""
    import threading


    batch, total = _five_tile_batch(), torch.get_num_threads()
    with torch.inference_mode():
        ref = _module(tiny_model, 1).predict_step(batch, 0)
    calls, real = [], tiny_model.forward_padded

    def spy(x, month, biome):
        calls.append((threading.current_thread().name, len(x), torch.get_num_threads(),
                      torch.is_inference_mode_enabled()))
        return real(x, month, biome)

    monkeypatch.setattr(tiny_model, "forward_padded", spy)
    module = _module(tiny_model, 2)
    with torch.inference_mode():
        got = module.predict_step(batch, 0)
    module.on_predict_end()
    assert len(got.outputs) == 5
    for a, b in zip(ref.outputs, got.outputs, strict=False):
        assert a.shape == b.shape == (4, 256, 240) and np.abs(a - b).max() <= 1e-6
    assert torch.get_num_threads() == total          # the caller's thread count is untouched
    if total >= 2:
        assert sorted(n for _, n, _, _ in calls) == [2, 3]
        assert all(name.startswith("stage2-stream") and threads == total // 2 and inference
                   for name, _, threads, inference in calls)
    else:
        assert [n for _, n, _, _ in calls] == [5]   # one core: one forward

    # Small batches (here 5 x 20 patch tokens) are not worth the hand-offs: one forward, all threads.
    calls.clear()
    small = _five_tile_batch(64, 80)
    with torch.inference_mode():
        module.predict_step(small, 1)
    module.on_predict_end()
    assert calls == [(threading.current_thread().name, 5, total, True)]


def test_cpu_streams_keep_the_callers_autocast(tiny_model):
    """Autocast is thread-local: chunks on worker threads must still run in the caller's bf16."""

    batch = _five_tile_batch()
    with torch.inference_mode():
        fp32 = _module(tiny_model, 1).predict_step(batch, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            one = _module(tiny_model, 1).predict_step(batch, 0)
            two = _module(tiny_model, 2).predict_step(batch, 0)
    for a, b, c in zip(one.outputs, two.outputs, fp32.outputs, strict=False):
        assert np.abs(a - b).max() <= 1e-6
        assert np.abs(a - c).max() > 1e-4       # bf16 really was used


def test_cpu_streams_need_larger_chunks_under_bf16(tiny_model):
    """Four 128 px tiles (4 x 64 tokens) split in two chunks in fp32, but run as one forward under bf16
    autocast, where a token costs half the time and the hand-off would eat the gain (benchmarks/README.md)."""

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: always one forward")
    module = _module(tiny_model, 2)
    x = collate([_tile(128, 128, s) for s in range(4)], 16).x
    assert module._n_streams(x) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module._n_streams(x) == 1
        big = collate([_tile(256, 256, s) for s in range(4)], 16).x      # chunks of 512 tokens
        assert module._n_streams(big) == 2


def test_bf16_weights_cast_once_give_the_same_outputs_and_are_restored(tiny_model):
    """precision=bf16 on the CPU casts Linear/conv weights once per run: same values as autocast's
    per-forward cast, and the model gets its fp32 weights back afterwards."""
    from stage2.predict.module import cast_matmul_weights

    batch = _five_tile_batch()
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = tiny_model.forward_padded(batch.x, batch.month, batch.biome)
        kept = cast_matmul_weights(tiny_model, torch.bfloat16)
        try:
            assert tiny_model.to_pixels.weight.dtype == torch.bfloat16
            assert tiny_model.encoder.norm.weight.dtype == torch.float32      # norms stay fp32
            got = tiny_model.forward_padded(batch.x, batch.month, batch.biome)
        finally:
            for param, fp32 in kept:
                param.data = fp32
    assert torch.equal(ref, got)
    for n, p in tiny_model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_keep_freed_memory_is_safe_to_call_and_works_on_glibc(monkeypatch):
    """The CPU pipeline keeps freed activations for reuse (fewer page faults); a no-op off glibc."""
    import ctypes
    import platform

    from stage2 import runtime

    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert runtime.keep_freed_memory() is on_glibc      # both mallopt calls accepted, where there is glibc

    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)           # e.g. musl (Alpine): no libc.so.6
    assert runtime.keep_freed_memory() is False
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.keep_freed_memory() is False


@pytest.mark.parametrize("shape", [(64, 64), (45, 70), (16, 17), (33, 200)])
def test_the_collated_batch_pads_each_tile_as_the_model_pads_it(shape):
    from stage2.model import pad_to_multiple
    from stage2.predict.data import stack_padded

    rng = np.random.default_rng(1)
    arrays = [rng.random((4, *shape), dtype=np.float32) for _ in range(3)]
    got = stack_padded(arrays, 16)
    want = torch.cat([pad_to_multiple(torch.from_numpy(a)[None], 16) for a in arrays]).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want)
    with pytest.raises(RuntimeError, match="mixed padded sizes"):
        stack_padded([arrays[0], rng.random((4, shape[0] + 16, shape[1]), dtype=np.float32)], 16)
