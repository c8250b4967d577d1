"""Logit soft-capping (scores -> cap * tanh(scores / cap) before the softmax): the Triton kernel
(interpreter, float32) against a float64 reference written here from the definition, in every
quant mode (the quantized modes against reference.py, which applies the same roundings), over
several shapes with odd sizes; the ops (opcheck, CPU path, autograd) and their errors."""
from __future__ import annotations

import math

import pytest
import torch

import vsopt.core  # noqa: F401  (registers the ops)
from vsopt.core.errors import KernelInputError
from vsopt.kernels.block_mask import reference as mask_ref
from vsopt.kernels.block_sparse import launch, reference
from vsopt.kernels.errors import KernelInputError as KernelLevelError

from .helpers import block_mask, rel_l2
from .test_block_sparse import FP8_P


def _inputs(B, Hq, Hkv, N, D, seed, magnitude=3.0):
    g = torch.Generator().manual_seed(seed)
    q = magnitude * torch.randn(B, Hq, N, D, generator=g)     # large scores: the cap binds
    k = torch.randn(B, Hkv, N, D, generator=g) + 0.3 * torch.randn(1, Hkv, 1, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    return q, k, v, g


def capped_attention_f64(q, k, v, token_mask, scale, cap):
    """The definition, in float64: softmax(cap * tanh(q k^T scale / cap) masked) v; empty rows 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v, lse


@pytest.mark.parametrize("N,D,bm,bn,Hq,Hkv", [(37, 16, 16, 16, 2, 2), (70, 32, 32, 16, 4, 2), (100, 64, 32, 32, 2, 1),
                                             (53, 32, 16, 32, 2, 1)])
@pytest.mark.parametrize("cap", [0.7, 5.0])
def test_kernel_with_cap_matches_the_float64_definition(N, D, bm, bn, Hq, Hkv, cap):
    q, k, v, g = _inputs(1, Hq, Hkv, N, D, seed=N + D + int(cap))
    mask = block_mask(1, Hq, math.ceil(N / bm), math.ceil(N / bn), 0.5, g)
    idx, cnt = mask_ref.mask_to_table(mask)
    scale = D ** -0.5
    out, lse = launch.block_sparse_attention(q, k, v, idx, cnt, scale, bm, bn, "none", with_lse=True, softcap=cap)
    tokens = reference.table_to_token_mask(idx, cnt, N, N, bm, bn)
    want, want_lse = capped_attention_f64(q, k, v, tokens, scale, cap)
    assert rel_l2(out, want) < 1e-5
    assert (lse.double() - want_lse).abs().max() < 1e-4
    ref, _ = reference.block_sparse_attention(q.double(), k.double(), v.double(), idx, cnt, scale, bm, bn, softcap=cap)
    assert rel_l2(ref, want) < 1e-12                       # reference.py is the definition
    uncapped, _ = launch.block_sparse_attention(q, k, v, idx, cnt, scale, bm, bn, "none")
    assert rel_l2(uncapped, want) > 1e-2                    # must NOT match: the cap is applied


@pytest.mark.parametrize("quant", ["int8", "fp8", "int8_fp8"])
@pytest.mark.parametrize("N,D,tile", [(45, 16, None), (77, 32, None), (64, 32, launch.Tile(32, 32, use_tma=True))])
def test_quantized_modes_with_cap_match_the_reference(quant, N, D, tile):
    q, k, v, g = _inputs(1, 2, 1, N, D, seed=N + len(quant))
    mask = block_mask(1, 2, math.ceil(N / 32), math.ceil(N / 32), 0.6, g)
    idx, cnt = mask_ref.mask_to_table(mask)
    scale = D ** -0.5
    out, lse = launch.block_sparse_attention(q, k, v, idx, cnt, scale, 32, 32, quant, with_lse=True, tile=tile,
                                             softcap=2.0)
    ref, ref_lse = reference.block_sparse_attention(q.double(), k.double(), v.double(), idx, cnt, scale, 32, 32, quant,
                                                    softcap=2.0)
    # the reference applies the same roundings, FP8 P included (a P value on an e4m3 rounding boundary
    # may round the other way: float32 exp2 in the kernel, float64 exp in the reference)
    assert rel_l2(out, ref) < (FP8_P if quant in ("fp8", "int8_fp8") else 1e-5)
    assert (lse.double() - ref_lse.double()).abs().max() < 1e-4
    tokens = reference.table_to_token_mask(idx, cnt, N, N, 32, 32)
    exact, _ = capped_attention_f64(q, k, v, tokens, scale, 2.0)
    assert rel_l2(out, exact) < 0.08         # and stays near the exact capped attention


def test_ops_take_the_cap_on_cpu_and_pass_opcheck():
    q, k, v, g = _inputs(1, 2, 1, 40, 16, seed=7)
    mask = block_mask(1, 2, 3, 3, 0.5, g)
    idx, cnt = torch.ops.vsopt.mask_to_table(mask)
    for op in (torch.ops.vsopt.block_sparse_attention.default, torch.ops.vsopt.block_sparse_attention_lse.default):
        torch.library.opcheck(op, (q, k, v, idx, cnt, 0.25, 16, 16, "int8", 1.5))
    out = torch.ops.vsopt.block_sparse_attention(q.double(), k.double(), v.double(), idx, cnt, 0.25, 16, 16, "none", 1.5)
    tokens = reference.table_to_token_mask(idx, cnt, 40, 40, 16, 16)
    assert rel_l2(out, capped_attention_f64(q, k, v, tokens, 0.25, 1.5)[0]) < 1e-12
    dense = torch.ops.vsopt.attention(q.double(), k.double(), v.double(), None, 0.25, False, 1.5)
    everything = torch.ones(1, 1, 40, 40, dtype=torch.bool)
    assert rel_l2(dense, capped_attention_f64(q, k, v, everything, 0.25, 1.5)[0]) < 1e-12
    torch.library.opcheck(torch.ops.vsopt.attention.default, (q, k, v, None, 0.25, False, 1.5))


def test_attention_with_cap_has_the_right_gradient():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = torch.rand(1, 1, 9, 9, generator=g) > 0.3
    keep[..., 0] = True
    torch.autograd.gradcheck(lambda a, b, c: torch.ops.vsopt.attention(a, b, c, keep, 0.9, False, 1.2), (q, k, v))
    torch.autograd.gradcheck(lambda a, b, c: torch.ops.vsopt.attention(a, b, c, None, 0.9, True, 0.5), (q, k, v))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_cap_is_named(bad):
    q, k, v, g = _inputs(1, 2, 1, 32, 16, seed=0)
    idx, cnt = mask_ref.mask_to_table(block_mask(1, 2, 2, 2, 1.0, g))
    with pytest.raises(KernelLevelError, match="softcap must be 0"):
        launch.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16, softcap=bad)
    with pytest.raises(KernelInputError, match="softcap must be 0"):
        torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16, "none", bad)
    with pytest.raises(KernelInputError, match="softcap must be 0"):
        torch.ops.vsopt.attention(q, k, v, None, 0.25, False, bad)


def test_k_smoothing_under_a_cap_adds_q_dot_mean_back():
    """K smoothing drops q . c (c = smoothing_mean(K)), which a soft cap does not ignore: the capped quantized modes
    add it back per row. With a 5-sigma common key component, int8 under a cap stays as accurate as
    without one; quantizing K unsmoothed instead triples the error."""
    from vsopt.kernels.quant import reference as quant_ref

    g = torch.Generator().manual_seed(0)
    N, D, cap = 512, 64, 5.0
    q, k, v = (torch.randn(1, 2, N, D, generator=g) for _ in range(3))
    k = k + 5.0 * torch.randn(1, 2, 1, D, generator=g)
    idx, cnt = mask_ref.mask_to_table(torch.ones(1, 2, N // 64, N // 64, dtype=torch.bool))
    tokens = torch.ones(1, 1, N, N, dtype=torch.bool)
    exact, _ = capped_attention_f64(q, k, v, tokens, D ** -0.5, cap)
    out, _ = reference.block_sparse_attention(q, k, v, idx, cnt, D ** -0.5, 64, 64, "int8", softcap=cap)
    kc, ks = quant_ref.quantize_blocks(k, 64, "int8")               # the same codes without smoothing
    unsmoothed = kc * ks.repeat_interleave(64, dim=2)[..., None]
    qh, _, _ = quant_ref.fake_quantize_qkv(q, k, v, "int8", 64, 64)
    plain, _ = capped_attention_f64(qh, unsmoothed, v, tokens, D ** -0.5, cap)
    assert rel_l2(out, exact) < 0.015 and rel_l2(plain, exact) > 2 * rel_l2(out, exact)
    # the kernel adds the same term (interpreter, a small case)
    qs, ks_, vs = q[:, :, :96, :32].contiguous(), k[:, :, :96, :32].contiguous(), v[:, :, :96, :32].contiguous()
    idx, cnt = mask_ref.mask_to_table(torch.ones(1, 2, 3, 3, dtype=torch.bool))
    got, _ = launch.block_sparse_attention(qs, ks_, vs, idx, cnt, 32 ** -0.5, 32, 32, "int8", softcap=cap)
    want, _ = reference.block_sparse_attention(qs.double(), ks_.double(), vs.double(), idx, cnt, 32 ** -0.5, 32, 32,
                                               "int8", softcap=cap)
    # 1e-3, not bit-level: the 64 sampled rows are summed in another float32 order than the
    # reference's, and a K code on a rounding boundary may step (one here: 2e-4); without q . c the
    # cap would make it percents
    assert rel_l2(got, want) < 1e-3


@pytest.mark.parametrize("quant", ["int8", "int8_int8"])
def test_sampled_smoothing_vector_is_the_one_the_cap_and_the_lse_get_back(quant):
    """N = 200 > 64 with a drifting key offset, so smoothing_mean (64 sampled rows) is far from K's
    full mean: the kernel's capped output and LSE match the reference (same c) tightly, and the
    exact capped definition to quantization accuracy; uncapped, the kernel's LSE plus the smoothing
    shift (core/lse.smoothing_shift, the merges' term) is the exact LSE, and a shift by the full mean
    instead would be off by far more than the rounding."""
    from vsopt.core.lse import EagerEmitter, smoothing_shift
    from vsopt.kernels.quant import reference as quant_ref

    g = torch.Generator().manual_seed(5)
    N, D, cap, scale = 200, 32, 3.0, 32 ** -0.5
    q, k, v = (torch.randn(1, 2, N, D, generator=g) for _ in range(3))
    k[..., :8] += 6.0 * torch.linspace(-1, 1, N)[:, None] + 4.0
    full_gap = (quant_ref.smoothing_mean(k) - k.mean(2)).abs().max()
    assert full_gap > 0.2
    idx, cnt = mask_ref.mask_to_table(block_mask(1, 2, 7, 7, 0.6, g))
    tokens = reference.table_to_token_mask(idx, cnt, N, N, 32, 32)
    out, lse = launch.block_sparse_attention(q, k, v, idx, cnt, scale, 32, 32, quant, with_lse=True, softcap=cap)
    ref, ref_lse = reference.block_sparse_attention(q.double(), k.double(), v.double(), idx, cnt, scale, 32, 32, quant,
                                                    softcap=cap)
    exact, exact_lse = capped_attention_f64(q, k, v, tokens, scale, cap)
    assert rel_l2(out, ref) < 2e-3 and (lse.double() - ref_lse.double()).abs().max() < 1e-3
    assert rel_l2(out, exact) < 0.03 and (lse.double() - exact_lse).abs().max() < 0.05
    # uncapped: the kernel's lse is that of the smoothed scores; the shift puts q . c back
    _, lse0 = launch.block_sparse_attention(q, k, v, idx, cnt, scale, 32, 32, quant, with_lse=True)
    _, ref_lse0 = reference.block_sparse_attention(q.double(), k.double(), v.double(), idx, cnt, scale, 32, 32, quant)
    assert (lse0.double() - ref_lse0.double()).abs().max() < 1e-4
    s = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~tokens, float("-inf"))
    want = torch.logsumexp(s, -1)
    shifted = lse0 + smoothing_shift(EagerEmitter("cpu"), q, k, scale)
    err = (shifted.double() - want).abs().mean()         # the roundings' (mean 0.009 here)
    by_full_mean = lse0.double() + scale * (q.double() @ k.double().mean(2, keepdim=True).transpose(-1, -2))[..., 0]
    assert err < 0.02 and (by_full_mean - want).abs().mean() > 4 * err   # the full mean's: 0.09
