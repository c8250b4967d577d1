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
    k_sum, _ = launch.channel_stats(x, None)
    codes, scale = launch.quantize_blocks(x, block, fmt, channel_sum=k_sum if smooth else None)
    ref_codes, ref_scale = reference.quantize_blocks(x, block, fmt, mean=x.mean(2) if smooth else None)
    assert codes.dtype == launch.CODE_DTYPE[fmt]
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    # Codes may differ by one step only where x / scale sits on a rounding tie (float32 order).
    mismatch = (codes.float() != ref_codes).float().mean()
    assert mismatch < 1e-3, f"{mismatch:.4f} of the codes differ"


def test_channel_stats_sum_and_absmax():
    k, v = _x(1, 3, 300, 32, seed=1, offset=-0.5), _x(1, 3, 300, 32, seed=2)
    k_sum, v_max = launch.channel_stats(k, v)        # 300 tokens: several programs add atomically? one here
    torch.testing.assert_close(k_sum, k.sum(2), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(v_max, v.abs().amax(2))


def test_channel_stats_across_programs(monkeypatch):
    monkeypatch.setattr(launch, "_STATS_ROWS", 64)   # 5 programs per head meet in the atomics
    k, v = _x(1, 2, 300, 16, seed=3, offset=1.0), _x(1, 2, 300, 16, seed=4)
    k_sum, v_max = launch.channel_stats(k, v)
    torch.testing.assert_close(k_sum, k.sum(2), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(v_max, v.abs().amax(2))


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
    same attention as K (softmax ignores q . mean)."""
    q, k, v = (_x(1, 2, 64, 32, seed=s, offset=2.0 if s == 7 else 0.0) for s in (6, 7, 8))
    qh, kh, vh = reference.fake_quantize_qkv(q, k, v, quant, 32, 32)
    assert rel_l2(qh, q) < bound and rel_l2(vh, v) < bound
    smoothed = k - k.mean(2, keepdim=True)
    assert rel_l2(kh, smoothed) < bound
    att = torch.softmax(q @ k.transpose(-1, -2), -1)
    att_smoothed = torch.softmax(q @ smoothed.transpose(-1, -2), -1)
    torch.testing.assert_close(att, att_smoothed, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="quant must be"):
        reference.fake_quantize_qkv(q, k, v, "none", 32, 32)


@pytest.mark.parametrize("call,message", [
    (lambda x: launch.quantize_blocks(x, 24, "int8"), "quantize_blocks: block must be a power of two >= 16, got 24"),
    (lambda x: launch.quantize_kv(x, x, None, None, 8, "int8", "fp8"),
     "quantize_kv: block must be a power of two >= 16, got 8"),
    (lambda x: launch.channel_stats(x, None, rows=96, tile=64),
     "channel_stats: tile must be a power of two >= 16 dividing rows, got tile 64, rows 96"),
    (lambda x: launch.stats_and_q(x, None, x, 48, "int8"), "stats_and_q: block_m must be a power of two >= 16, got 48"),
    (lambda x: launch.stats_and_q(x, None, x, 64, "int8", tile=12),
     "stats_and_q: tile must be a power of two >= 16 dividing rows, got tile 12, rows 128"),
    (lambda x: launch.quantize_blocks(x[..., :24], 64, "int8"),
     "quantize_blocks: head_dim must be a power of two >= 16, got 24"),
])
def test_block_tile_and_head_dim_must_be_powers_of_two(call, message):
    with pytest.raises(ValueError) as e:  # checked before any launch
        call(torch.zeros(1, 1, 32, 32))
    assert str(e.value) == message
