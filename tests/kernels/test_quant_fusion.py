"""Quantization in torch ops (kernels/quant/fusable.py): the same codes and scales as the Triton
quantization kernels (interpreter, CPU), and fused by Inductor into the ops that produce q, k, v
(RoPE here): the compiled graph has no kernel of its own for the quantization."""
from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from vsopt.kernels.block_sparse import launch as bsa_launch
from vsopt.kernels.quant import launch
from vsopt.kernels.quant.fusable import quantize_blocks_fusable, quantize_qkv_fusable

from .helpers import block_mask


def _x(B, H, N, D, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, D, generator=g) * (1 + 3 * torch.rand(1, H, N, 1, generator=g)) + offset


@pytest.mark.parametrize("mode", ["int8", "fp8", "int8_fp8"])
@pytest.mark.parametrize("N,D,bm,bn", [(37, 16, 16, 16), (100, 32, 32, 16)])
def test_fusable_quantization_equals_the_triton_kernels(mode, N, D, bm, bn):
    q, k, v = _x(2, 2, N, D, 1), _x(2, 2, N, D, 2, offset=0.7), _x(2, 2, N, D, 3)
    want = launch.quantize_qkv(q, k, v, mode, bm, bn)
    got = quantize_qkv_fusable(q, k, v, mode, bm, bn)
    for name in ("q", "q_scale", "k", "k_scale", "v", "v_scale", "k_mean"):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), name
        if name in ("q", "q_scale", "v", "v_scale"):     # same formula, same order: bit-equal
            assert torch.equal(a.float(), b.float()), name
        elif name == "k_scale":                          # K's sampled mean: fp32 sums in another order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
        elif name == "k":                                # ... moves a code on a rounding boundary, rarely
            assert (a.float() != b.float()).float().mean() < 2e-3, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_traced_launch_uses_the_fusable_form_and_matches_eager(monkeypatch):
    """A launch that is not plain eager (what Inductor's tracing of the triton_op gives: here the
    launcher is told so) quantizes with the torch ops, and gives the eager launcher's result."""
    from vsopt.kernels.block_mask import reference as mask_ref

    q, k, v = _x(1, 2, 40, 16, 4), _x(1, 2, 40, 16, 5, offset=0.5), _x(1, 2, 40, 16, 6)
    idx, cnt = mask_ref.mask_to_table(block_mask(1, 2, 3, 3, 0.6, torch.Generator().manual_seed(0)))
    args = (q, k, v, idx, cnt, 0.25, 16, 16, "int8_fp8")
    calls = []
    real = bsa_launch.quantize_qkv_fusable
    monkeypatch.setattr(bsa_launch, "quantize_qkv_fusable", lambda *a: calls.append(1) or real(*a))
    eager, _ = bsa_launch.block_sparse_attention(*args)
    assert not calls
    monkeypatch.setattr(bsa_launch, "FUSE_QUANT_WHEN_TRACED", True)
    monkeypatch.setattr(bsa_launch, "plain_eager", lambda *t: False)
    monkeypatch.setattr(bsa_launch, "triton_launcher", lambda kernel, eager: kernel)
    traced, _ = bsa_launch.block_sparse_attention(*args)
    assert calls
    torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _kernels(fn, *args) -> list[str]:
    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(fn, dynamic=False), *args)
    return re.findall(r"(cpp_fused_\w+|triton_\w+) = async_compile", "\n".join(code))


def test_inductor_fuses_the_quantization_into_the_producers():
    B, N, H, D = 1, 300, 2, 32
    g = torch.Generator().manual_seed(7)
    x, v = (torch.randn(B, N, H, D, generator=g) for _ in range(2))
    cos, sin = torch.randn(N, 1, D // 2, generator=g), torch.randn(N, 1, D // 2, generator=g)

    def produce(x, v, cos, sin):   # (B, N, H, D) projections -> RoPE -> the op's (B, H, N, D) views
        return _rope(x, cos, sin).transpose(1, 2), _rope(x * 0.5 + 1, cos, sin).transpose(1, 2), v.transpose(1, 2)

    def q_only(x, v, cos, sin):
        return quantize_blocks_fusable(produce(x, v, cos, sin)[0], 64, "int8")

    def qkv(x, v, cos, sin):
        r = quantize_qkv_fusable(*produce(x, v, cos, sin), "int8_fp8", 64, 64)
        return r.q, r.q_scale, r.k, r.k_scale, r.v, r.v_scale

    def unquantized(x, v, cos, sin):
        return tuple(t.contiguous() for t in produce(x, v, cos, sin))

    assert len(_kernels(q_only, x, v, cos, sin)) == 1          # RoPE and Q's quantization: one kernel
    assert len(_kernels(qkv, x, v, cos, sin)) <= len(_kernels(unquantized, x, v, cos, sin))
    torch._dynamo.reset()
    got = torch.compile(qkv, dynamic=False)(x, v, cos, sin)
    want = qkv(x, v, cos, sin)
    for a, b in zip(got, want):
        assert (a.float() != b.float()).float().mean() < 2e-3
