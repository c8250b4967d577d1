"""Launchers of the quantization kernels: validation, allocation, grid.

quantize_qkv(q, k, v, quant, block_m, block_n) -> QuantizedQKV: everything the attention kernel
    needs in one call: for FP8 / INT8 P V, V's channel abs-max (one pass over V); then Q, K (smoothed
    by the mean of a strided sample of its rows, computed inside K's launch: no statistics pass over
    K) and, for 8-bit P V, V quantized. int8 (16-bit P V): two launches, one read of Q and of K;
    fuse_kv: K and V in one launch (quantize_kv); q_in_kernel: Q left to the attention kernel's
    prologue (QuantizedQKV.q is then the 16-bit q and q_scale None).
channel_stats(v) -> V's abs-max per (b, h, channel), float32 (B, H, D).
stats_and_q(v, q, block_m, fmt) -> (v_max, Q codes, Q scales): the statistics and Q's quantization in
    one launch, side by side.
quantize_k(k, block, fmt) -> (K codes, K scales, k_mean): K smoothed by reference.smoothing_mean,
    which comes back as k_mean (B, H, D) float32.
quantize_kv(k, v, v_max, block, fmt, pv_format) -> (K codes, K scales, k_mean, V codes transposed,
    V scales): quantize_k of K and quantize_v_fp8 of V in one launch.
quantize_blocks(x, block, fmt) -> (codes (B, H, N, D) int8 | float8_e4m3fn, scale float32
    (B, H, ceil(N/block))), unsmoothed (Q).
"""
from __future__ import annotations

import dataclasses

import torch
import triton

from ..errors import check
from ..runtime import interpreting, plain_eager, triton_launcher
from ..spec import QuantMode
from . import kernel
from .reference import MIN_AMAX, SMOOTHING_SAMPLES, check_pv_format

CODE_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# Tokens reduced by one statistics program before its atomics: 128 was 5-7% faster than 256 at wan480 on
# an H200 (gpu_check_quant_overhead.py's sweep: 0.093-0.095 ms against 0.100-0.101).
_STATS_ROWS = 128


def _check_power_of_two(what: str, name: str, value: int, rows: int | None = None) -> None:
    """`name` (a head dim, block or tile) must be a power of two >= 16; given rows, also divide rows."""
    ok = value >= 16 and value & (value - 1) == 0
    if rows is None:
        check(ok, f"{what}: {name} must be a power of two >= 16, got {value}")
    else:
        check(ok and rows >= value and rows % value == 0,
              f"{what}: {name} must be a power of two >= 16 dividing rows, got {name} {value}, rows {rows}")


def _check_input(x: torch.Tensor, what: str) -> None:
    check(x.dim() == 4, f"{what}: expected (B, H, N, D), got shape {tuple(x.shape)}")
    check(x.stride(-1) == 1, f"{what}: the head dimension must be contiguous (stride 1), got strides {x.stride()}")
    _check_power_of_two(what, "head_dim", x.shape[-1])


def channel_stats(v: torch.Tensor, rows: int = _STATS_ROWS, num_warps: int = 4, tile: int = 64,
                  defer: bool = False) -> torch.Tensor:
    """Abs-max of v over tokens (B, H, D) float32 (V's per-channel scale of the 8-bit P V modes).
    rows: tokens per program, tile: tokens per load (a power of two >= 16 dividing rows);
    num_warps, defer (kernel.py DEFER: rows reduced once, after the loop): for tuning sweeps."""
    _check_power_of_two("channel_stats", "tile", tile, rows)
    _check_input(v, "channel_stats")
    B, H, N, D = v.shape
    v_max = torch.zeros((B, H, D), dtype=torch.float32, device=v.device)
    launch = triton_launcher(kernel._channel_stats_kernel, plain_eager(v))
    launch[(triton.cdiv(N, rows), B * H)](
        v, v_max, H, N, v.stride(0), v.stride(1), v.stride(2),
        ROWS=rows, TILE=tile, HEAD_DIM=D, DEFER=defer, num_warps=num_warps)
    return v_max


def _block_warps(block: int, D: int) -> int:
    return 4 if block * D <= 8192 else 8


def _quantize_blocks(x: torch.Tensor, block: int, fmt: str, smooth: bool, num_warps: int | None):
    what = "quantize_k" if smooth else "quantize_blocks"
    _check_input(x, what)
    check(fmt in CODE_DTYPE, f"{what}: fmt must be 'int8' or 'fp8', got {fmt!r}")
    _check_power_of_two(what, "block", block)
    B, H, N, D = x.shape
    nb = triton.cdiv(N, block)
    codes = torch.empty((B, H, N, D), dtype=CODE_DTYPE[fmt], device=x.device)
    scale = torch.empty((B, H, nb), dtype=torch.float32, device=x.device)
    mean = torch.empty((B, H, D), dtype=torch.float32, device=x.device) if smooth else None
    triton_launcher(kernel._quantize_blocks_kernel, plain_eager(x))[(nb, B * H)](
        x, mean if smooth else scale, codes, scale, H, N, nb, x.stride(0), x.stride(1), x.stride(2),
        BLOCK=block, HEAD_DIM=D, IS_FP8=fmt == "fp8", SMOOTH=smooth, MIN_AMAX=MIN_AMAX,
        ROUND_IN_FP32=interpreting(), SAMPLES=SMOOTHING_SAMPLES, num_warps=num_warps or _block_warps(block, D))
    return codes, scale, mean


def quantize_blocks(x: torch.Tensor, block: int, fmt: str, num_warps: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(b, h, token block) quantization of x (B, H, N, D), unsmoothed (Q).
    num_warps: None (by the block's size) or a tuning sweep's choice."""
    codes, scale, _ = _quantize_blocks(x, block, fmt, False, num_warps)
    return codes, scale


def quantize_k(k: torch.Tensor, block: int, fmt: str, num_warps: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(b, h, token block) quantization of k minus reference.smoothing_mean(k), computed by the
    same launch: (codes, scales, k_mean (B, H, D) float32)."""
    return _quantize_blocks(k, block, fmt, True, num_warps)


def quantize_v_fp8(v: torch.Tensor, abs_max: torch.Tensor, block_n: int = 128, num_warps: int = 4,
                   fmt: str = "fp8") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 of v (B, H, N, D) given its channel abs-max (B, H, D): (codes transposed
    (B, H, D, N_pad) with N_pad = N rounded up to 16, scale float32 (B, H, D)). One program per
    block_n tokens (128: full-width 128-byte stores of each channel row). fmt "int8": INT8 codes
    (scale amax / 127), for the experimental INT8 P V."""
    check(fmt in CODE_DTYPE, f"quantize_v_fp8: fmt must be 'int8' or 'fp8', got {fmt!r}")
    _check_input(v, "quantize_v_fp8")
    B, H, N, D = v.shape
    n_pad = triton.cdiv(N, 16) * 16
    scale = torch.empty((B, H, D), dtype=torch.float32, device=v.device)
    # No zero fill: the kernel writes the padding columns (a fill of an FP8 tensor runs ATen's slow
    # generic kernel: 0.15 ms at Wan 480p).
    codes_t = torch.empty((B, H, D, n_pad), dtype=CODE_DTYPE[fmt], device=v.device)
    launch = triton_launcher(kernel._quantize_channels_fp8_kernel, plain_eager(v, abs_max))
    launch[(triton.cdiv(N, block_n), B * H)](
        v, abs_max, scale, codes_t, H, N, n_pad, v.stride(0), v.stride(1), v.stride(2), BLOCK_N=block_n,
        HEAD_DIM=D, MIN_AMAX=MIN_AMAX, ROUND_IN_FP32=interpreting(), IS_INT8=fmt == "int8", num_warps=num_warps)
    return codes_t, scale


def quantize_kv(k: torch.Tensor, v: torch.Tensor, v_max: torch.Tensor, block: int, fmt: str, pv_format: str,
                num_warps: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_k(k, block, fmt) and quantize_v_fp8(v, v_max, fmt=pv_format) in one launch
    (kernel._quantize_kv_kernel): (K codes, K scales, k_mean, V codes (B, H, D, N_pad), V scales)."""
    _check_input(k, "quantize_kv")
    _check_input(v, "quantize_kv")
    check(k.shape == v.shape, f"quantize_kv: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    check(fmt in CODE_DTYPE and pv_format in CODE_DTYPE,
          f"quantize_kv: fmt and pv_format must be 'int8' or 'fp8', got {fmt!r}, {pv_format!r}")
    _check_power_of_two("quantize_kv", "block", block)
    B, H, N, D = k.shape
    nb = triton.cdiv(N, block)
    n_pad = triton.cdiv(N, 16) * 16
    kc = torch.empty((B, H, N, D), dtype=CODE_DTYPE[fmt], device=k.device)
    ks = torch.empty((B, H, nb), dtype=torch.float32, device=k.device)
    k_mean = torch.empty((B, H, D), dtype=torch.float32, device=k.device)
    vs = torch.empty((B, H, D), dtype=torch.float32, device=k.device)
    vc = torch.empty((B, H, D, n_pad), dtype=CODE_DTYPE[pv_format], device=k.device)   # padding written by the kernel
    triton_launcher(kernel._quantize_kv_kernel, plain_eager(k, v, v_max))[(nb, B * H)](
        k, k_mean, kc, ks, v, v_max, vs, vc, H, N, nb, n_pad,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        BLOCK=block, HEAD_DIM=D, K_FP8=fmt == "fp8", V_INT8=pv_format == "int8", MIN_AMAX=MIN_AMAX,
        ROUND_IN_FP32=interpreting(), SAMPLES=SMOOTHING_SAMPLES, num_warps=num_warps or 2 * _block_warps(block, D))
    return kc, ks, k_mean, vc, vs


def stats_and_q(v: torch.Tensor, q: torch.Tensor, block_m: int, fmt: str, rows: int = _STATS_ROWS, tile: int = 64,
                defer: bool = False, num_warps: int = 4):
    """channel_stats(v) and quantize_blocks(q, block_m, fmt) in one launch (kernel._stats_and_q_kernel):
    (v_max, Q codes, Q scales), the same values."""
    _check_input(v, "stats_and_q")
    _check_input(q, "stats_and_q")
    check(fmt in CODE_DTYPE, f"stats_and_q: fmt must be 'int8' or 'fp8', got {fmt!r}")
    _check_power_of_two("stats_and_q", "block_m", block_m)
    _check_power_of_two("stats_and_q", "tile", tile, rows)
    B, H, N, D = v.shape
    Hq, Nq = q.shape[1], q.shape[2]
    check(q.shape[0] == B and q.shape[3] == D, f"stats_and_q: q {tuple(q.shape)} does not match v {tuple(v.shape)}")
    v_max = torch.zeros((B, H, D), dtype=torch.float32, device=v.device)
    nqb, chunks = triton.cdiv(Nq, block_m), triton.cdiv(N, rows)
    codes = torch.empty((B, Hq, Nq, D), dtype=CODE_DTYPE[fmt], device=q.device)
    scale = torch.empty((B, Hq, nqb), dtype=torch.float32, device=q.device)
    n_stats, n_q = chunks * B * H, nqb * B * Hq
    triton_launcher(kernel._stats_and_q_kernel, plain_eager(v, q))[(n_stats + n_q,)](
        v, v_max, q, codes, scale, H, Hq, N, Nq, chunks, nqb, n_stats, n_q,
        v.stride(0), v.stride(1), v.stride(2), q.stride(0), q.stride(1), q.stride(2),
        ROWS=rows, TILE=tile, HEAD_DIM=D, DEFER=defer, BLOCK_Q=block_m, Q_FP8=fmt == "fp8",
        MIN_AMAX=MIN_AMAX, ROUND_IN_FP32=interpreting(), num_warps=num_warps)
    return v_max, codes, scale


@dataclasses.dataclass
class QuantizedQKV:
    """Inputs of the quantized attention kernel. q_scale None: q is the 16-bit input, quantized by
    the attention kernel itself (quantize_qkv's q_in_kernel). v is the original tensor when P V stays 16-bit,
    else FP8 codes transposed (B, H, D, N_pad) with v_scale (B, H, D). k_mean: the vector smoothing
    subtracted from K (reference.smoothing_mean), for the per-row term q . k_mean a soft cap needs back."""
    q: torch.Tensor
    q_scale: torch.Tensor | None
    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None
    k_mean: torch.Tensor   # (B, H, D) float32: what smoothing subtracted from K


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quant: QuantMode | str, block_m: int,
                 block_n: int, pv_format: str | None = None, fuse_kv: bool = False, q_in_kernel: bool = False,
                 q_with_stats: bool = False) -> QuantizedQKV:
    """Quantize q, k, v for `quant` mode ("int8", "fp8", "int8_fp8", "int8_int8"): see
    kernels/quant/reference.py. pv_format "int8" (8-bit P V modes only): V in INT8 codes per channel
    (int8_int8's own; with fp8 / int8_fp8 the launcher's experimental option). fuse_kv (8-bit P V):
    K and V quantized in one launch; q_in_kernel: Q not quantized here (q stays the input, q_scale
    None: the attention kernel quantizes it in its prologue); q_with_stats (8-bit P V): Q quantized in
    the launch of V's channel statistics (stats_and_q). All give the same codes and scales."""
    mode = QuantMode.parse(quant, "quantize_qkv: quant")
    check(mode is not QuantMode.NONE, f"quantize_qkv: quant must be a quantized mode, got {quant!r}")
    fmt = mode.qk_format
    pv_format = check_pv_format(mode, pv_format)
    if pv_format and q_with_stats and not q_in_kernel:
        v_max, qc, qs = stats_and_q(v, q, block_m, fmt)
    else:
        v_max = channel_stats(v) if pv_format else None
        qc, qs = (q, None) if q_in_kernel else quantize_blocks(q, block_m, fmt)
    if pv_format and fuse_kv:
        kc, ks, k_mean, vc, vs = quantize_kv(k, v, v_max, block_n, fmt, pv_format)
        return QuantizedQKV(qc, qs, kc, ks, vc, vs, k_mean)
    kc, ks, k_mean = quantize_k(k, block_n, fmt)
    if pv_format:
        vc, vs = quantize_v_fp8(v, v_max, fmt=pv_format)
        return QuantizedQKV(qc, qs, kc, ks, vc, vs, k_mean)
    return QuantizedQKV(qc, qs, kc, ks, v, None, k_mean)
