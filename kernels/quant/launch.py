"""Launchers of the quantization kernels: validation, allocation, grid.

quantize_blocks(x, block, fmt, smooth) -> (codes (B, H, N, D) int8 | float8_e4m3fn, scale (B, H, NB) f32)
quantize_v_fp8(v) -> (codes_t float8_e4m3fn (B, H, D, N_pad) with N_pad = N rounded up to 16, scale (B, H, D))
"""
from __future__ import annotations

import os

import torch
import triton

from ..errors import check
from . import kernel
from .reference import MIN_AMAX, QMAX

# The interpreter's fp8 cast mis-rounds (see kernel._to_fp8); under it the kernels round in fp32 first.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CODE_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def _check_input(x: torch.Tensor, what: str) -> None:
    check(x.dim() == 4, f"{what}: expected (B, H, N, D), got shape {tuple(x.shape)}")
    check(x.stride(-1) == 1, f"{what}: the head dimension must be contiguous (stride 1), got strides {x.stride()}")
    D = x.shape[-1]
    check(D >= 16 and D & (D - 1) == 0, f"{what}: head_dim must be a power of two >= 16, got {D}")


def quantize_blocks(x: torch.Tensor, block: int, fmt: str, smooth: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(b, h, token block) quantization of x (B, H, N, D); with smooth, x minus its token mean."""
    _check_input(x, "quantize_blocks")
    check(fmt in CODE_DTYPE, f"quantize_blocks: fmt must be 'int8' or 'fp8', got {fmt!r}")
    check(block >= 16 and block & (block - 1) == 0, f"quantize_blocks: block must be a power of two >= 16, got {block}")
    B, H, N, D = x.shape
    nb = triton.cdiv(N, block)
    codes = torch.empty((B, H, N, D), dtype=CODE_DTYPE[fmt], device=x.device)
    scale = torch.empty((B, H, nb), dtype=torch.float32, device=x.device)
    mean = x.mean(dim=2, dtype=torch.float32).contiguous() if smooth else scale  # dummy pointer when unused
    torch.library.wrap_triton(kernel._quantize_blocks_kernel)[(nb, B * H)](
        x, mean, codes, scale, H, N, nb, x.stride(0), x.stride(1), x.stride(2),
        BLOCK=block, HEAD_DIM=D, IS_FP8=fmt == "fp8", SMOOTH=smooth, QMAX=QMAX[fmt], MIN_AMAX=MIN_AMAX,
        ROUND_IN_FP32=INTERPRET,
        num_warps=4 if block * D <= 8192 else 8)
    return codes, scale


def quantize_v_fp8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 of v (B, H, N, D), written transposed (B, H, D, N_pad)."""
    _check_input(v, "quantize_v_fp8")
    B, H, N, D = v.shape
    n_pad = triton.cdiv(N, 16) * 16
    vmin, vmax = torch.aminmax(v, dim=2)
    scale = (torch.maximum(vmax.float(), -vmin.float()).clamp_min(MIN_AMAX) / QMAX["fp8"]).contiguous()
    codes_t = (torch.zeros if n_pad != N else torch.empty)((B, H, D, n_pad), dtype=torch.float8_e4m3fn,
                                                           device=v.device)
    block_n = 64
    torch.library.wrap_triton(kernel._quantize_channels_fp8_kernel)[(triton.cdiv(N, block_n), B * H)](
        v, scale, codes_t, H, N, n_pad, v.stride(0), v.stride(1), v.stride(2), BLOCK_N=block_n, HEAD_DIM=D, ROUND_IN_FP32=INTERPRET,
        num_warps=4)
    return codes_t, scale
