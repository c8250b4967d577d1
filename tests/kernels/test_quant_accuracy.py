"""Accuracy of the quantized modes against float32 attention, through reference.py, which rounds
exactly as the kernels do (Q/K per block with K smoothing, V per channel in e4m3, P per row and key
block in e4m3 scaled to 448; the kernel agrees with it: test_block_sparse.py, test_softcap.py).

Issue 16's targets are cosine >= 0.999 and relative L2 <= 0.03 on random normal and structured
inputs (a few dominant keys, large magnitudes; a large common key offset) at every density. What the roundings give, and what
is asserted here:
- int8 (INT8 Q K, 16-bit P V): both targets.
- int8_fp8 (INT8 Q K, FP8 P V, SageAttention2's recipe): the cosine target; relative L2 ~0.035,
  NOT the 0.03 target: e4m3 keeps 3 mantissa bits, so each rounded operand carries ~2-2.7% rms
  relative error, and P and V are both rounded (P ~2.0% after the per-block scale, V ~2.7%); for
  zero-mean V the output error does not average down relative to the output. Below 0.03 needs a
  second P V product (a V or P residual), i.e. the tensor-core time of 16-bit P V.
- fp8 (FP8 Q K as well): cosine ~0.9985, relative L2 ~0.05: FP8 Q K adds ~4%; below both targets.
"""
from __future__ import annotations

import pytest
import torch

from vsopt.kernels.block_mask import reference as mask_ref
from vsopt.kernels.block_sparse import reference
from vsopt.kernels.quant import reference as quant_ref

from .helpers import block_mask, rel_l2

N, D, H, BLOCK = 512, 64, 4, 64
# (cosine at least, relative L2 at most) per mode, on every input and density below
MEETS = {"int8": (0.999, 0.03), "int8_fp8": (0.999, 0.04), "fp8": (0.996, 0.09)}


def _inputs(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
    if kind == "structured":
        k[:, :, [5, 200, 450]] *= 8.0                          # a few dominant keys
        k = k + 2.0 * torch.randn(1, H, 1, D, generator=g)    # a large common key component (smoothing's case)
        q = 2.0 * q
        v = 20.0 * v + 5.0                                     # large magnitudes, a channel offset
    elif kind == "offset":   # a 5-sigma common key offset on a quarter of the channels, drifting over
        # the tokens: the smoothing (64 sampled rows) must take it off, or K's INT8 / e4m3 steps grow
        k[..., : D // 4] += 5.0 * (1.0 + 0.2 * torch.linspace(-1, 1, N)[:, None])
    return q, k, v, g


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@pytest.mark.parametrize("kind", ["random", "structured", "offset"])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_quantized_modes_against_float32(kind, density):
    q, k, v, g = _inputs(kind, seed=int(density * 10) + len(kind) + 100 * (kind == "offset"))
    idx, cnt = mask_ref.mask_to_table(block_mask(1, H, N // BLOCK, N // BLOCK, density, g))
    exact, _ = reference.block_sparse_attention(q, k, v, idx, cnt, D ** -0.5, BLOCK, BLOCK, "none")
    for mode, (min_cos, max_rel) in MEETS.items():
        out, _ = reference.block_sparse_attention(q, k, v, idx, cnt, D ** -0.5, BLOCK, BLOCK, mode)
        cos, rel = _cosine(out, exact), rel_l2(out, exact)
        assert cos >= min_cos and rel <= max_rel, f"{mode}: cosine {cos:.5f}, relative L2 {rel:.4f}"
        assert rel > 1e-3                                      # the roundings are really applied
    if kind == "offset":   # without smoothing, the offset costs accuracy: what the sampled mean saves
        kc, ks = quant_ref.quantize_blocks(k, BLOCK, "int8")
        unsmoothed = kc * ks.repeat_interleave(BLOCK, dim=2)[..., None]
        qh, _, _ = quant_ref.fake_quantize_qkv(q, k, v, "int8", BLOCK, BLOCK)
        mask = reference.table_to_block_mask(idx, cnt, N, BLOCK).expand(1, -1, -1, -1)
        plain, _ = reference.masked_attention(qh, unsmoothed, v, mask, D ** -0.5, blocks=(BLOCK, BLOCK))
        smoothed, _ = reference.block_sparse_attention(q, k, v, idx, cnt, D ** -0.5, BLOCK, BLOCK, "int8")
        assert rel_l2(plain, exact) > 1.4 * rel_l2(smoothed, exact)   # int8: 0.020 unsmoothed, 0.012 smoothed


def test_per_block_p_scale_beats_a_row_max_scale_on_dominant_keys():
    """P scaled per key block to e4m3's 448 (what the kernel does) against P scaled by the row max
    only (what it did): far fewer tiny probabilities lost to e4m3's subnormals."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, 1024, D, generator=g, dtype=torch.float64) for _ in range(3))
    k[:, :, [5, 700]] *= 8.0
    q = 2.0 * q
    s = q @ k.transpose(-1, -2) * D ** -0.5
    p = torch.softmax(s, -1)
    lse = torch.logsumexp(s, -1, keepdim=True)
    row_max = s.amax(-1, keepdim=True)
    by_row = quant_ref.round_to_format(torch.exp(s - row_max) * 448.0, "fp8") / 448.0 * torch.exp(row_max - lse)
    by_block = quant_ref.round_probabilities_fp8(s, lse, 64)
    err_row, err_block = rel_l2(by_row @ v, p @ v), rel_l2(by_block @ v, p @ v)
    assert err_block < 0.6 * err_row, (err_block, err_row)


def test_fp8_p_rounding_groups_and_empty_groups():
    """round_probabilities_fp8 on a hand case: the group max maps to exactly 448 (kept exactly), an
    all-masked group gives zeros, a ragged last group works."""
    s = torch.tensor([[0.0, -1.0, float("-inf"), float("-inf"), -0.5]], dtype=torch.float64)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = quant_ref.round_probabilities_fp8(s, lse, 2)
    exact = torch.softmax(s, -1)
    assert p[0, 0] == exact[0, 0] and p[0, 4] == exact[0, 4]   # group maxima are exact
    assert p[0, 2] == 0 and p[0, 3] == 0
    assert 0 < abs(float(p[0, 1] - exact[0, 1])) < 0.07 * float(exact[0, 1])   # e4m3 rounding of e^-1
