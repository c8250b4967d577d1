"""The quantization off the separate passes (issue 16 item 3): K and V quantized in one launch
(quant/launch.quantize_kv) and Q quantized in the attention kernel's prologue (kernel.py QUANT_Q,
launch.QUANTIZE_Q_IN_KERNEL). Under the interpreter on odd shapes: the fused launch writes the
codes and scales the separate kernels write, bit for bit, and both against the pure-PyTorch
reference (reference.quantize_blocks / quantize_channels_fp8); the kernel with Q quantized in its
prologue gives the output of the kernel on Q quantized ahead, and the float64 reference's, in every
quantized mode, with tiles smaller than the table block (the group's amax over rows the tile does
not own) and grouped kv heads."""
from __future__ import annotations

import math

import pytest
import torch

from vsopt.kernels.block_mask import reference as mask_ref
from vsopt.kernels.block_sparse import launch, reference
from vsopt.kernels.errors import KernelInputError
from vsopt.kernels.quant import launch as qlaunch
from vsopt.kernels.quant import reference as qref

from .helpers import block_mask, rel_l2

QUANT_MODES = ("int8", "fp8", "int8_fp8", "int8_int8")


def _codes_value(codes: torch.Tensor) -> torch.Tensor:
    return codes.float()


@pytest.mark.parametrize("fmt,pv_format", [("int8", "fp8"), ("fp8", "fp8"), ("int8", "int8")])
@pytest.mark.parametrize("B,H,N,D,block", [(2, 3, 45, 16, 16), (1, 2, 130, 32, 64)])
def test_fused_kv_launch_equals_the_separate_kernels_and_the_reference(fmt, pv_format, B, H, N, D, block):
    g = torch.Generator().manual_seed(N + D)
    k = torch.randn(B, H, N, D, generator=g) * 3 + 1.0
    v = torch.randn(B, H, N, D, generator=g) * 5 - 2.0
    v[:, :, :, 0] *= 40                                              # one large channel
    v_max = qlaunch.channel_stats(v)
    kc, ks, km, vc, vs = qlaunch.quantize_kv(k, v, v_max, block, fmt, pv_format)
    kc0, ks0, km0 = qlaunch.quantize_k(k, block, fmt)
    vc0, vs0 = qlaunch.quantize_v_fp8(v, v_max, fmt=pv_format)
    assert kc.dtype == kc0.dtype and vc.dtype == vc0.dtype and vc.shape == (B, H, D, -(-N // 16) * 16)
    for got, want in ((kc, kc0), (ks, ks0), (km, km0), (vc, vc0), (vs, vs0)):
        assert torch.equal(_codes_value(got), _codes_value(want))
    # against the pure-PyTorch reference (K's smoothing mean summed in another order, K in float64:
    # a code on a rounding boundary may differ)
    rk, rks = qref.quantize_blocks(k.double(), block, fmt, mean=qref.smoothing_mean(k))
    rv, rvs = qref.quantize_channels_fp8(v.double(), pv_format)
    torch.testing.assert_close(ks.double(), rks.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(vs.double(), rvs.double(), rtol=1e-6, atol=0)
    step = 1.0 if fmt == "int8" else 32.0    # one code step at most (e4m3 near 448: 32)
    assert (kc.double() - rk).abs().max() <= step and (kc.double() != rk).float().mean() < 0.01
    assert torch.equal(vc[..., :N].double().transpose(2, 3), rv) and not vc[..., N:].float().any()


def test_quantize_qkv_options_give_the_same_codes():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 77, 32, generator=g) for _ in range(3))
    k = k + 4.0 * torch.linspace(-1, 1, 77)[:, None]     # a drifting key offset: the smoothing matters
    for mode in ("int8_fp8", "int8_int8", "fp8"):
        base = qlaunch.quantize_qkv(q, k, v, mode, 32, 32)
        fused = qlaunch.quantize_qkv(q, k, v, mode, 32, 32, fuse_kv=True)
        with_stats = qlaunch.quantize_qkv(q, k, v, mode, 32, 32, q_with_stats=True)
        in_kernel = qlaunch.quantize_qkv(q, k, v, mode, 32, 32, fuse_kv=True, q_in_kernel=True)
        torch.testing.assert_close(base.k_mean, qref.smoothing_mean(k), rtol=1e-6, atol=1e-6)
        for other in (fused, with_stats):
            for name in ("q", "q_scale", "k", "k_scale", "v", "v_scale", "k_mean"):
                assert torch.equal(_codes_value(getattr(base, name)), _codes_value(getattr(other, name))), (mode, name)
        assert in_kernel.q is q and in_kernel.q_scale is None
        assert torch.equal(in_kernel.k.float(), base.k.float()) and torch.equal(in_kernel.v.float(), base.v.float())
        assert torch.equal(in_kernel.k_mean, base.k_mean)


def test_quantize_kv_rejects_bad_input():
    k = torch.randn(1, 2, 40, 16)
    m = qlaunch.channel_stats(k)
    with pytest.raises(KernelInputError, match="pv_format"):
        qlaunch.quantize_kv(k, k, m, 16, "int8", "int4")
    with pytest.raises(KernelInputError, match="differ"):
        qlaunch.quantize_kv(k, k[:, :, :20], m, 16, "int8", "fp8")


@pytest.mark.parametrize("mode", QUANT_MODES)
@pytest.mark.parametrize("B,Hq,Hkv,N,D,bm,bn,tile", [
    (1, 2, 1, 45, 16, 32, 16, (16, 16)),     # odd N, GQA, a tile half the table's query block (SPLIT_M 2)
    (2, 2, 2, 70, 32, 16, 32, None),         # batch, a ragged key block, the tile the table block
])
def test_q_quantized_in_the_prologue_matches_q_quantized_ahead(monkeypatch, mode, B, Hq, Hkv, N, D, bm, bn, tile):
    g = torch.Generator().manual_seed(N + D + len(mode))
    q = torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64)
    q[:, :, N // 2] *= 9.0                              # a large row: the group's amax is not every tile's
    k, v = (torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    idx, cnt = mask_ref.mask_to_table(block_mask(1, Hq, math.ceil(N / bm), math.ceil(N / bn), 0.5, g))
    scale = D ** -0.5
    run = lambda: launch.block_sparse_attention(q.float(), k.float(), v.float(), idx, cnt, scale, bm, bn, mode,  # noqa: E731
                                                with_lse=True, tile=tile)
    ahead, ahead_lse = run()
    monkeypatch.setattr(launch, "QUANTIZE_Q_IN_KERNEL", True)
    monkeypatch.setattr(launch, "FUSE_KV_QUANT", True)
    passes = []
    for name in ("quantize_blocks", "quantize_k"):
        separate = getattr(qlaunch, name)
        monkeypatch.setattr(qlaunch, name, lambda x, *a, _f=separate, **kw: passes.append(x.shape) or _f(x, *a, **kw))
    inside, inside_lse = run()
    assert passes == ([] if mode != "int8" else [k.shape])   # no Q pass; K alone only where V stays 16-bit
    assert torch.isfinite(inside).all()
    torch.testing.assert_close(inside, ahead, rtol=0, atol=1e-6)
    torch.testing.assert_close(inside_lse, ahead_lse, rtol=0, atol=1e-6)
    ref, _ = reference.block_sparse_attention(q, k, v, idx, cnt, scale, bm, bn, mode)
    # the reference applies the kernel's roundings; e4m3 P groups follow the kernel tile (tile=None: the same)
    assert rel_l2(inside, ref) < (3e-3 if tile is None or "fp8" not in mode else 5e-2)


def test_q_in_kernel_with_a_soft_cap(monkeypatch):
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=g) for _ in range(3))
    idx, cnt = mask_ref.mask_to_table(block_mask(1, 2, 4, 4, 0.6, g))
    ahead, _ = launch.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16, "int8_int8", softcap=2.0)
    monkeypatch.setattr(launch, "QUANTIZE_Q_IN_KERNEL", True)
    inside, _ = launch.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16, "int8_int8", softcap=2.0)
    torch.testing.assert_close(inside, ahead, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["int8"])
def test_int8_codes_round_ties_away_from_zero_as_the_reference(fmt):
    """The conversion-free INT8 rounding (quant/kernel.py _int8_codes) on exact ties, both signs,
    both parities, the extremes and random values: the reference's codes, bit for bit."""
    ties = torch.tensor([127.0, -127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 0.0, -0.0, 0.49999997,
                         -0.49999997, 63.5, -64.5, 1e-8, -1e-8])
    g = torch.Generator().manual_seed(0)
    rnd = (torch.rand(16 * 16 - ties.numel(), generator=g) * 2 - 1) * 127
    x = torch.cat([ties, rnd]).view(1, 1, 16, 16)          # amax 127: scale 1, y = x exactly
    codes, scale = qlaunch.quantize_blocks(x, 16, fmt)
    ref, ref_scale = qref.quantize_blocks(x.double(), 16, fmt)
    assert float(scale) == 1.0 and float(ref_scale) == 1.0
    assert torch.equal(codes.double(), ref)
    assert codes.view(-1)[:10].tolist() == [127, -127, 1, -1, 2, -2, 3, -3, 127, -127]


@pytest.mark.parametrize("rows,tile", [(64, 16), (128, 32)])
def test_deferred_channel_stats_equal_the_per_tile_ones(rows, tile):
    g = torch.Generator().manual_seed(rows)
    v = torch.randn(2, 3, 201, 16, generator=g) * 4
    m0 = qlaunch.channel_stats(v, rows, 4, tile)
    m1 = qlaunch.channel_stats(v, rows, 4, tile, defer=True)
    assert torch.equal(m1, m0) and torch.equal(m1, v.abs().amax(dim=2))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("Hq,Hkv,N,block_m,rows", [(4, 2, 77, 16, 64), (2, 2, 200, 32, 128)])
def test_stats_and_q_in_one_launch_equal_the_separate_launches(fmt, Hq, Hkv, N, block_m, rows):
    g = torch.Generator().manual_seed(N + Hq)
    q = torch.randn(2, Hq, N, 16, generator=g) * 2
    v = torch.randn(2, Hkv, N, 16, generator=g) + 0.3
    v_max, qc, qs = qlaunch.stats_and_q(v, q, block_m, fmt, rows=rows)
    qc0, qs0 = qlaunch.quantize_blocks(q, block_m, fmt)
    assert torch.equal(v_max, qlaunch.channel_stats(v, rows))
    assert torch.equal(qc.float(), qc0.float()) and torch.equal(qs, qs0)


def test_q_with_stats_option_of_the_launcher(monkeypatch):
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 60, 16, generator=g) for _ in range(3))
    idx, cnt = mask_ref.mask_to_table(block_mask(1, 2, 4, 4, 0.6, g))
    for mode in ("int8", "int8_int8"):
        ahead, _ = launch.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16, mode)
        monkeypatch.setattr(launch, "FUSE_Q_WITH_STATS", True)
        calls = []
        one_launch = qlaunch.stats_and_q
        monkeypatch.setattr(qlaunch, "stats_and_q", lambda *a, **kw: calls.append(1) or one_launch(*a, **kw))
        fused, _ = launch.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16, mode)
        assert calls == ([] if mode == "int8" else [1])   # int8 has no statistics launch to share
        monkeypatch.setattr(qlaunch, "stats_and_q", one_launch)
        monkeypatch.setattr(launch, "FUSE_Q_WITH_STATS", False)
        torch.testing.assert_close(fused, ahead, rtol=0, atol=1e-6)
