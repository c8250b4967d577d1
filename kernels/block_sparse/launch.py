"""Launcher of the block-sparse attention kernel: validation, quantization, work order, autotuning.

block_sparse_attention(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, quant, with_lse)
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) with Hq % Hkv == 0, head dim contiguous; fp16/bf16
    (float32 too: the interpreter tests use it; on a GPU its dots run as tf32).
    kv_indices int32 (Bt, Hq, ceil(Nq/block_m), MAXK), kv_counts int32 (Bt, Hq, ceil(Nq/block_m)),
    Bt in {1, B}; indices ascending and < ceil(Nk/block_n) (not checked here: that needs a sync).
    Returns (out (B, Hq, Nq, D) in q's dtype, lse float32 (B, Hq, Nq) or None).

Work order: programs run in decreasing order of their row's count (a stable sort over the
flattened (b, h, qb) rows), so the longest rows start first and the short ones fill the tail;
with equal counts the natural order is kept, so neighbouring programs share K/V in L2.
Tile shape: autotuned per (head_dim, table block, quant mode) over a pruned config list; the
kernel tile divides the table block (a 128x128 table block can run as 128x64 tiles).
"""
from __future__ import annotations

import math

import torch
import triton

from ..errors import check
from ..runtime import interpreting
from ..quant import launch as quant_launch
from ..quant.reference import pv_is_fp8
from . import kernel
from .inputs import check_inputs

QUANT_CODE = {"none": 0, "int8": 1, "fp8": 2, "int8_fp8": 3}

# (BLOCK_M, BLOCK_N, num_warps, num_stages), best guesses first. The pruner keeps those that fit the
# table block; the interpreter (CPU tests) runs only the first that fits.
_CONFIGS = [
    (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 4), (128, 64, 8, 4), (64, 64, 4, 3),
    (128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 2, 2), (16, 16, 2, 1),
]


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    tm, tn = args["TABLE_BLOCK_M"], args["TABLE_BLOCK_N"]
    # Tiles that divide the table block and are not much smaller than it (small tiles waste the MMA).
    fits = [c for c in configs
            if tm % c.kwargs["BLOCK_M"] == 0 and tn % c.kwargs["BLOCK_N"] == 0
            and c.kwargs["BLOCK_M"] >= min(tm, 64) and c.kwargs["BLOCK_N"] >= min(tn, 32)]
    if not fits:  # tiny table blocks: the table block itself
        fits = [triton.Config({"BLOCK_M": tm, "BLOCK_N": tn}, num_warps=4, num_stages=2)]
    return fits[:1] if interpreting() else fits[:4]


_tuned_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _CONFIGS],
    key=["HEAD_DIM", "TABLE_BLOCK_M", "TABLE_BLOCK_N", "QUANT", "EVEN_N", "WRITE_LSE"],
    prune_configs_by={"early_config_prune": _prune},
)(kernel._block_sparse_fwd_kernel)


_ORDER_CACHE: dict[tuple, torch.Tensor] = {}
_ORDER_CACHE_SIZE = 16


def work_order(kv_counts: torch.Tensor, batch: int) -> torch.Tensor:
    """int32 (batch * H * QB,) flattened (b, h, qb) rows, largest count first (stable).

    Eager calls on a real CUDA tensor reuse the order computed for the same counts tensor (same
    storage, shape and version counter), saving the sort's launches on every call of a static
    plan. A stale entry (a new tensor at a freed address) is still a permutation of all rows, so it
    can cost balance, never correctness."""
    cacheable = kv_counts.device.type == "cuda" and type(kv_counts) is torch.Tensor \
        and not torch.compiler.is_compiling()
    key = (kv_counts.device, kv_counts.data_ptr(), kv_counts._version, tuple(kv_counts.shape), batch) \
        if cacheable else None
    if key is not None and key in _ORDER_CACHE:
        return _ORDER_CACHE[key]
    counts = kv_counts.expand(batch, -1, -1).reshape(-1)
    order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
    if key is not None:
        if len(_ORDER_CACHE) >= _ORDER_CACHE_SIZE:
            _ORDER_CACHE.pop(next(iter(_ORDER_CACHE)))
        _ORDER_CACHE[key] = order
    return order


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                           kv_counts: torch.Tensor, scale: float, block_m: int, block_n: int,
                           quant: str = "none", with_lse: bool = False, tile: tuple[int, int] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the Triton kernel (see the module docstring for shapes). tile=(BLOCK_M, BLOCK_N) skips
    autotuning and runs that kernel tile (it must divide the table block): for tests and sweeps."""
    check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, quant)
    check(q.dtype in (torch.float16, torch.bfloat16, torch.float32),
          f"block_sparse_attention: dtype must be float16, bfloat16 or float32, got {q.dtype}")
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    check(D in (16, 32, 64, 128), f"block_sparse_attention: the kernel supports head_dim 16, 32, 64, 128, got {D}")
    check(q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1,
          "block_sparse_attention: the head dimension of q, k, v must be contiguous (stride 1)")
    check(scale > 0, f"block_sparse_attention: scale must be positive, got {scale}")
    check(quant == "none" or q.dtype != torch.float32 or interpreting() or q.device.type == "cpu",
          "block_sparse_attention: quantized modes take float16/bfloat16 inputs")
    kv_indices, kv_counts = kv_indices.contiguous(), kv_counts.contiguous()
    QB, KB = triton.cdiv(Nq, block_m), triton.cdiv(Nk, block_n)

    out_dtype = q.dtype
    q_scale = k_scale = v_scale = None
    if quant != "none":
        quantized = quant_launch.quantize_qkv(q, k, v, quant, block_m, block_n)
        q, k, v = quantized.q, quantized.k, quantized.v
        q_scale, k_scale, v_scale = quantized.q_scale, quantized.k_scale, quantized.v_scale
    if pv_is_fp8(quant):   # v is (B, H, D, N_pad): token stride 1 (the kernel knows), channel stride N_pad
        stride_vn, stride_vd = 1, v.stride(2)
    else:
        stride_vn, stride_vd = v.stride(2), 1
    out = torch.empty((B, Hq, Nq, D), dtype=out_dtype, device=q.device)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device) if with_lse else out
    order = work_order(kv_counts, B)
    unused = order   # stands in for the scale pointers a mode does not read
    Bt = kv_counts.shape[0]
    grid = lambda meta: (order.numel() * (block_m // meta["BLOCK_M"]),)  # noqa: E731
    if tile is not None:
        check(block_m % tile[0] == 0 and block_n % tile[1] == 0 and min(tile) >= 16,
              f"block_sparse_attention: tile {tile} must divide the table block ({block_m}, {block_n})")
        launch = torch.library.wrap_triton(kernel._block_sparse_fwd_kernel)
        tile_args = {"BLOCK_M": tile[0], "BLOCK_N": tile[1], "num_warps": 4, "num_stages": 2}
    else:
        launch, tile_args = torch.library.wrap_triton(_tuned_kernel), {}
    launch[grid](
        q, k, v, out, lse,
        q_scale if q_scale is not None else unused, k_scale if k_scale is not None else unused,
        v_scale if v_scale is not None else unused,
        kv_indices, kv_counts, order,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), stride_vn, stride_vd,
        out.stride(0), out.stride(1), out.stride(2),
        kv_indices.stride(0) if Bt > 1 else 0, kv_indices.stride(1), kv_indices.stride(2),
        kv_counts.stride(0) if Bt > 1 else 0, kv_counts.stride(1),
        Hq, Hq // Hkv, Nq, Nk, QB, KB, scale * math.log2(math.e),
        HEAD_DIM=D, TABLE_BLOCK_M=block_m, TABLE_BLOCK_N=block_n, QUANT=QUANT_CODE[quant],
        WRITE_LSE=with_lse, EVEN_N=Nk % block_n == 0, ROUND_IN_FP32=interpreting(), **tile_args,
    )
    return out, (lse if with_lse else None)
