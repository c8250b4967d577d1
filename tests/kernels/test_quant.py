"""The fused quantization kernels (Triton interpreter, CPU) against kernels/quant/reference.py."""
from __future__ import annotations

import pytest
import torch

from vsopt.kernels.quant import launch, reference

from .helpers import rel_l2


def _x(B, H, N, D, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, D, generator=g) * (1 + 3 * torch.rand(1, H, N, 1, generator=g)) + offset


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("N,D,block", [(37, 16, 16), (100, 32, 32), (64, 64, 64)])
@pytest.mark.parametrize("smooth", [False, True])
def test_block_codes_and_scales_equal_the_reference(fmt, N, D, block, smooth):
    x = _x(2, 2, N, D, seed=N + D + block, offset=0.7)
    if smooth:
        codes, scale, mean = launch.quantize_k(x, block, fmt)
        torch.testing.assert_close(mean, reference.smoothing_mean(x), rtol=1e-6, atol=1e-6)
    else:
        codes, scale = launch.quantize_blocks(x, block, fmt)
    ref_codes, ref_scale = reference.quantize_blocks(x, block, fmt, mean=reference.smoothing_mean(x) if smooth else None)
    assert codes.dtype == launch.CODE_DTYPE[fmt]
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    # Codes may differ by one step only where x / scale sits on a rounding tie (float32 order).
    mismatch = (codes.float() != ref_codes).float().mean()
    assert mismatch < 1e-3, f"{mismatch:.4f} of the codes differ"


@pytest.mark.parametrize("N", [1, 63, 64, 65, 200, 1000])
def test_k_launch_smooths_by_the_sampled_mean(N):
    """The K launch's smoothing vector is reference.smoothing_mean (64 strided rows, all rows when
    N <= 64), and every program of a head used the one it wrote out: the codes are those of the
    same formula (fusable.py, bit-equal to the kernels) with that vector."""
    from vsopt.kernels.quant.fusable import quantize_blocks_fusable

    x = _x(2, 2, N, 16, seed=N, offset=3.0)
    x[:, :, :, :4] += 20.0 * torch.linspace(0, 1, N)[:, None]    # a drifting offset: sample != full mean
    for fmt in ("int8", "fp8"):
        codes, scale, mean = launch.quantize_k(x, 16, fmt)
        want = reference.smoothing_mean(x)
        assert mean.dtype == torch.float32 and mean.shape == (2, 2, 16)
        torch.testing.assert_close(mean, want, rtol=1e-6, atol=1e-6)
        same_codes, same_scale = quantize_blocks_fusable(x, 16, fmt, mean=mean)
        assert torch.equal(codes.float(), same_codes.float()) and torch.equal(scale, same_scale)
    rows = reference.smoothing_rows(N)
    assert rows.tolist() == (list(range(N)) if N <= 64 else [i * N // 64 for i in range(64)])
    if N > 64:
        assert not torch.allclose(want, x.mean(2), atol=1e-2)       # really a sample, not the full mean


def test_channel_stats_absmax():
    v = _x(1, 3, 300, 32, seed=2)
    torch.testing.assert_close(launch.channel_stats(v), v.abs().amax(2))


def test_channel_stats_across_programs(monkeypatch):
    monkeypatch.setattr(launch, "_STATS_ROWS", 64)   # 5 programs per head meet in the atomics
    v = _x(1, 2, 300, 16, seed=4)
    torch.testing.assert_close(launch.channel_stats(v), v.abs().amax(2))


@pytest.mark.parametrize("block_n", [128, 16])
def test_v_fp8_transposed_codes(block_n):
    """Codes transposed, the padding columns written as zeros by the kernel (the buffer is empty)."""
    v = _x(1, 2, 45, 32, seed=5)
    codes_t, scale = launch.quantize_v_fp8(v, v.abs().amax(2), block_n=block_n)
    ref_codes, ref_scale = reference.quantize_channels_fp8(v)
    assert codes_t.shape == (1, 2, 32, 48)              # N padded to 16 for aligned rows
    torch.testing.assert_close(scale, ref_scale)
    assert torch.equal(codes_t.float()[..., :45].transpose(2, 3), ref_codes)
    assert codes_t.float()[..., 45:].eq(0).all()


@pytest.mark.parametrize("quant,bound", [("int8", 0.03), ("fp8", 0.08), ("int8_fp8", 0.03)])
def test_fake_quantization_error_is_small_and_smoothing_keeps_softmax(quant, bound):
    """reference.fake_quantize_qkv: dequantized inputs stay close, and the smoothed K gives the
    same attention as K (softmax ignores q . c)."""
    q, k, v = (_x(1, 2, 200, 32, seed=s, offset=2.0 if s == 7 else 0.0) for s in (6, 7, 8))
    qh, kh, vh = reference.fake_quantize_qkv(q, k, v, quant, 32, 32)
    assert rel_l2(qh, q) < bound and rel_l2(vh, v) < bound
    smoothed = k - reference.smoothing_mean(k)[:, :, None]
    assert rel_l2(kh, smoothed) < bound
    att = torch.softmax(q @ k.transpose(-1, -2), -1)
    att_smoothed = torch.softmax(q @ smoothed.transpose(-1, -2), -1)
    torch.testing.assert_close(att, att_smoothed, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="quant must be"):
        reference.fake_quantize_qkv(q, k, v, "none", 32, 32)


@pytest.mark.parametrize("call,message", [
    (lambda x: launch.quantize_blocks(x, 24, "int8"), "quantize_blocks: block must be a power of two >= 16, got 24"),
    (lambda x: launch.quantize_k(x, 24, "int8"), "quantize_k: block must be a power of two >= 16, got 24"),
    (lambda x: launch.quantize_kv(x, x, None, 8, "int8", "fp8"),
     "quantize_kv: block must be a power of two >= 16, got 8"),
    (lambda x: launch.channel_stats(x, rows=96, tile=64),
     "channel_stats: tile must be a power of two >= 16 dividing rows, got tile 64, rows 96"),
    (lambda x: launch.stats_and_q(x, x, 48, "int8"), "stats_and_q: block_m must be a power of two >= 16, got 48"),
    (lambda x: launch.stats_and_q(x, x, 64, "int8", tile=12),
     "stats_and_q: tile must be a power of two >= 16 dividing rows, got tile 12, rows 128"),
    (lambda x: launch.quantize_blocks(x[..., :24], 64, "int8"),
     "quantize_blocks: head_dim must be a power of two >= 16, got 24"),
])
def test_block_tile_and_head_dim_must_be_powers_of_two(call, message):
    with pytest.raises(ValueError) as e:  # checked before any launch
        call(torch.zeros(1, 1, 32, 32))
    assert str(e.value) == message
