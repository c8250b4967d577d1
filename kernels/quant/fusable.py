"""Quantization of Q, K, V written as plain torch ops that Inductor fuses into their producers.

quantize_qkv_fusable(q, k, v, quant, block_m, block_n) -> QuantizedQKV, the same codes, scales and
layouts as kernels/quant/launch.quantize_qkv (its Triton launches), computed with the same
formulas (scale = amax / QMAX, codes of x * (1 / scale), rounding half away from zero for INT8, the
e4m3 cast for FP8, V transposed to (B, H, D, N_pad16) with zero padding).

Why: eagerly the Triton kernels are the fast form (one read of each input, ~0.2 ms at Wan 480p, 8-14%
of the attention at density 0.2, docs/KERNELS.md). Under torch.compile the attention op's launcher
(kernels/block_sparse/launch.run_checked, traced by Inductor) uses this form instead: Inductor then
sees the quantization as a reduction (the block amax) and the pointwise ops that read its result,
i.e. the softmax shape it fuses into one kernel, and pulls the producer of q / k / v (RoPE, the
projection's bias and reshape) into that kernel's loads. Q's codes come out of the producer's kernel
and no bf16 Q is written; K is smoothed by reference.smoothing_mean (the mean of 64 sampled rows, an
index_select and a small reduction, not a pass over K); V needs a channel amax over all tokens and the
transposed codes. What remains on the attention's side is no separate quantization launch.

Agreement with the Triton kernels: equal codes and scales except where the fp32 sum of the 64 sampled
rows is added in another order: a last-bit difference of the mean can move a K code sitting on a
rounding boundary by one step (tests/kernels/test_quant_fusion.py).
"""
from __future__ import annotations

import torch

from ..errors import check
from ..spec import QuantMode
from .launch import QuantizedQKV
from .reference import MIN_AMAX, QMAX, check_pv_format, smoothing_mean


def _codes(y: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "int8":
        return torch.where(y >= 0, torch.floor(y + 0.5), -torch.floor(-y + 0.5)).to(torch.int8)
    return y.to(torch.float8_e4m3fn)


def quantize_blocks_fusable(x: torch.Tensor, block: int, fmt: str, mean: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (B, H, N, D) int8 | float8_e4m3fn, scale float32 (B, H, ceil(N / block))) of x
    (B, H, N, D) per (b, h, block of tokens), smoothed by mean (B, H, D) float32 when given."""
    B, H, N, D = x.shape
    nb = -(-N // block)
    xf = x.float()
    if mean is not None:
        xf = xf - mean[:, :, None, :]
    groups = torch.nn.functional.pad(xf, (0, 0, 0, nb * block - N)).view(B, H, nb, block, D)
    scale = groups.abs().amax(dim=(3, 4)).clamp_min(MIN_AMAX) / QMAX[fmt]
    codes = _codes(groups * (1.0 / scale)[..., None, None], fmt)
    return codes.view(B, H, nb * block, D)[:, :, :N], scale


def quantize_v_fp8_fusable(v: torch.Tensor, fmt: str = "fp8") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes transposed (B, H, D, N_pad16) float8_e4m3fn (fmt "int8": int8), zero past N; scale
    float32 (B, H, D))."""
    B, H, N, D = v.shape
    vf = v.float()
    scale = vf.abs().amax(dim=2).clamp_min(MIN_AMAX) / QMAX[fmt]
    n_pad = -(-N // 16) * 16
    y = torch.nn.functional.pad((vf * (1.0 / scale)[:, :, None, :]).transpose(2, 3), (0, n_pad - N))
    return _codes(y, fmt).contiguous(), scale


def quantize_qkv_fusable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quant: QuantMode | str, block_m: int,
                         block_n: int, pv_format: str | None = None) -> QuantizedQKV:
    """What launch.quantize_qkv returns, as torch ops (see the module docstring)."""
    mode = QuantMode.parse(quant, "quantize_qkv_fusable: quant")
    check(mode is not QuantMode.NONE, f"quantize_qkv_fusable: quant must be a quantized mode, got {quant!r}")
    pv_format = check_pv_format(mode, pv_format)
    fmt = mode.qk_format
    k_mean = smoothing_mean(k)
    qc, qs = quantize_blocks_fusable(q, block_m, fmt)
    kc, ks = quantize_blocks_fusable(k, block_n, fmt, mean=k_mean)
    if pv_format is not None:
        vc, vs = quantize_v_fp8_fusable(v, pv_format)
        return QuantizedQKV(qc.contiguous(), qs, kc.contiguous(), ks, vc, vs, k_mean)
    return QuantizedQKV(qc.contiguous(), qs, kc.contiguous(), ks, v, None, k_mean)
