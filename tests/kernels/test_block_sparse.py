"""The block-sparse attention kernel (Triton interpreter, CPU, float32) against reference.py."""
from __future__ import annotations

import math

import pytest
import torch

from vsopt.kernels.block_mask import reference as mask_ref
from vsopt.kernels.block_sparse import launch, reference
from vsopt.kernels.errors import KernelInputError

from .helpers import block_mask, rel_l2

# float32 in the interpreter: the kernel is exact up to summation order.
EXACT = 1e-5
# reference.py rounds FP8 P as the kernel does; a P value on an e4m3 rounding boundary may still
# round the other way (float32 exp2 in the kernel): a few such flips at these tiny sizes.
FP8_P = 2e-3
# A kernel tile narrower than the table's key block scales P per tile, the reference per table
# block: the same accuracy, other roundings (e4m3's 3 mantissa bits: a few percent apart).
FP8_P_OTHER_GROUPS = 0.05


def _inputs(B, Hq, Hkv, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g) + 0.3 * torch.randn(1, Hkv, 1, D, generator=g)  # a mean to smooth
    v = torch.randn(B, Hkv, N, D, generator=g)
    return q, k, v, g


def _run_and_compare(q, k, v, mask, bm, bn, quant, tile=None, bound=None, lse_tol=1e-4):
    idx, cnt = mask_ref.mask_to_table(mask)
    scale = q.shape[-1] ** -0.5
    out, lse = launch.block_sparse_attention(q, k, v, idx, cnt, scale, bm, bn, quant, with_lse=True, tile=tile)
    ref, ref_lse = reference.block_sparse_attention(q, k, v, idx, cnt, scale, bm, bn, quant)
    bound = bound if bound is not None else (FP8_P if quant in ("fp8", "int8_fp8") else EXACT)
    assert torch.isfinite(out).all()
    assert rel_l2(out, ref) < bound, f"rel L2 {rel_l2(out, ref):.2e} >= {bound}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - ref_lse[finite]).abs().max() < lse_tol
    return out, ref


@pytest.mark.parametrize("N,D,bm,bn", [(37, 16, 16, 16), (70, 32, 32, 16), (100, 64, 32, 32), (64, 32, 16, 32)])
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_bf16_path_matches_reference(N, D, bm, bn, density):
    q, k, v, g = _inputs(1, 2, 2, N, D, seed=N * D + int(density * 10))
    mask = block_mask(1, 2, math.ceil(N / bm), math.ceil(N / bn), density, g)
    _run_and_compare(q, k, v, mask, bm, bn, "none")


@pytest.mark.parametrize("quant", ["int8", "fp8", "int8_fp8"])
@pytest.mark.parametrize("N,D", [(45, 16), (96, 32)])
def test_quantized_modes_match_reference(quant, N, D):
    q, k, v, g = _inputs(1, 2, 1, N, D, seed=N + D)
    mask = block_mask(1, 2, math.ceil(N / 32), math.ceil(N / 16), 0.5, g)
    _run_and_compare(q, k, v, mask, 32, 16, quant)


def test_gqa_batched_table_and_skipped_head():
    q, k, v, g = _inputs(2, 4, 2, 50, 16, seed=3)
    mask = block_mask(2, 4, 4, 4, 0.5, g)          # Bt = B: each batch its own pattern
    mask[1, 2] = False                             # a skipped head: output 0, lse -inf
    out, _ = _run_and_compare(q, k, v, mask, 16, 16, "none")
    assert out[1, 2].eq(0).all() and out[0, 2].abs().sum() > 0


def test_tiles_smaller_than_the_table_block():
    q, k, v, g = _inputs(1, 2, 1, 75, 16, seed=5)
    mask = block_mask(1, 2, 3, 3, 0.5, g)
    _run_and_compare(q, k, v, mask, 32, 32, "none", tile=(16, 16))
    _run_and_compare(q, k, v, mask, 32, 32, "int8", tile=(32, 16))


def test_structured_inputs():
    """A few dominant keys, large magnitudes, a key block that no query visits."""
    q, k, v, g = _inputs(1, 2, 2, 80, 32, seed=11)
    k[:, :, [3, 41]] *= 10.0
    q[:, 1] *= 8.0
    v[:, :, 60:] += 50.0                           # large values in the last key block ...
    mask = block_mask(1, 2, 5, 5, 0.6, g)
    mask[..., 3] = False                           # ... and a key block no row visits
    out, ref = _run_and_compare(q, k, v, mask, 16, 16, "none")
    for quant in ("int8", "int8_fp8"):
        _run_and_compare(q, k, v, mask, 16, 16, quant)


def test_the_table_matters():
    """Must NOT match: the same inputs with another table give another output."""
    q, k, v, g = _inputs(1, 1, 1, 48, 16, seed=2)
    sparse = block_mask(1, 1, 3, 3, 0.0, g)
    idx, cnt = mask_ref.mask_to_table(sparse)
    dense_idx, dense_cnt = mask_ref.mask_to_table(torch.ones_like(sparse))
    out, _ = launch.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16)
    dense, _ = launch.block_sparse_attention(q, k, v, dense_idx, dense_cnt, 0.25, 16, 16)
    assert rel_l2(out, dense) > 0.1


def test_work_order_strategies():
    counts = torch.tensor([[[1, 3, 2], [3, 0, 1]]], dtype=torch.int32)   # (1, H=2, QB=3)
    flat = counts.expand(2, -1, -1).reshape(-1)
    lpt = launch.work_order(counts, batch=2, strategy="lpt")
    assert flat[lpt.long()].tolist() == sorted(flat.tolist(), reverse=True)
    assert lpt[:4].tolist() == [1, 3, 7, 9]                        # ties keep their natural order
    per_head = launch.work_order(counts, batch=2)                     # the default
    assert per_head.tolist() == [1, 2, 0, 3, 5, 4, 7, 8, 6, 9, 11, 10]
    assert launch.work_order(counts, batch=2, strategy="natural").tolist() == list(range(12))
    for order in (lpt, per_head):
        assert sorted(order.tolist()) == list(range(12))            # a permutation of every row
    with pytest.raises(KernelInputError, match="strategy"):
        launch.work_order(counts, batch=2, strategy="random")


@pytest.mark.parametrize("bad,message", [
    ("dtype", "int32"), ("shape", "table must be"), ("heads", "multiple of kv heads"), ("quant", "quant must be"),
    ("block", "power of two")])
def test_bad_inputs_name_the_problem(bad, message):
    q, k, v, g = _inputs(1, 2, 1, 32, 16, seed=0)
    idx, cnt = mask_ref.mask_to_table(block_mask(1, 2, 2, 2, 1.0, g))
    args = dict(q=q, k=k, v=v, kv_indices=idx, kv_counts=cnt, scale=0.25, block_m=16, block_n=16, quant="none")
    if bad == "dtype":
        args["kv_indices"] = idx.long()
    elif bad == "shape":
        args["kv_counts"], args["kv_indices"] = cnt[:, :, :1], idx[:, :, :1]
    elif bad == "heads":
        args["k"] = args["v"] = torch.randn(1, 3, 32, 16)
    elif bad == "quant":
        args["quant"] = "int4"
    else:
        args["block_m"] = 24
    with pytest.raises(KernelInputError, match=message):
        launch.block_sparse_attention(**args)


@pytest.mark.parametrize("quant", ["none", "int8", "fp8"])
@pytest.mark.parametrize("N", [64, 77])
def test_tma_loads_match_reference(quant, N):
    """The tensor-descriptor (TMA) load path, including a ragged last key block read past the end."""
    q, k, v, g = _inputs(1, 2, 1, N, 32, seed=N + len(quant))
    mask = block_mask(1, 2, math.ceil(N / 32), math.ceil(N / 32), 0.6, g)
    bound = FP8_P_OTHER_GROUPS if quant == "fp8" else None   # 16-key tiles in 32-key table blocks
    _run_and_compare(q, k, v, mask, 32, 32, quant, tile=launch.Tile(32, 16, use_tma=True), bound=bound)
    if quant == "fp8":   # full-width tiles round P in the reference's groups
        _run_and_compare(q, k, v, mask, 32, 32, quant, tile=launch.Tile(32, 32, use_tma=True))



def test_tma_configs_need_16_byte_aligned_rows():
    """The autotuner drops the TMA configurations for K/V views TMA cannot address."""
    base = torch.zeros(1, 2, 64, 33, dtype=torch.bfloat16)          # rows of 33 elements = 66 bytes
    first32, shifted = base[..., :32], base[..., 1:]
    assert not launch._tma_compatible(first32, first32.stride(2))  # aligned base, 66-byte row stride
    assert not launch._tma_compatible(shifted, 32)                 # 64-byte rows, base 2 bytes off
    packed = torch.zeros(1, 2, 64, 32, dtype=torch.bfloat16)
    assert launch._tma_compatible(packed, packed.stride(2))
