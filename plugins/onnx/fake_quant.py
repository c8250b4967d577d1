"""The kernels' quantization (kernels/quant/reference.py) in standard ONNX ops, so the portable
form computes what vsopt's reference computes for the int8 / fp8 / int8_fp8 / int8_int8 modes.

Fake quantization: each group is divided by its scale (amax over the group / QMAX), rounded to the
format (int8: half away from zero; fp8: Cast to float8 e4m3fn and back) and multiplied back. Groups:
Q per (b, h, block of block_m tokens); K per (b, h, block of block_n tokens) after subtracting its
smoothing vector (quant_ref.smoothing_mean: a Gather of quant_ref.smoothing_rows, then ReduceMean); V, for the 8-bit P V modes only, per (b, h, channel) (INT8 in int8_int8). Everything in
float32, as the reference. Needs opset 19 (float8) for the fp8 modes.

fp8_p_attention: the 8-bit P V modes' attention with P rounded as the kernels round it
(quant_ref.round_probabilities_fp8: per row and key block, scaled by the block's row max to 448,
or to INT8's 127 in int8_int8).
"""
from __future__ import annotations

import onnx_ir as ir
from onnxscript import opset18 as op
from onnxscript import opset19

from vsopt.kernels.quant import reference as quant_ref
from vsopt.kernels.spec import QuantMode

from .building import FLOAT, dims, i64, repeat_heads, scalar_like

FP8_OPSET = 19


def _round(x: ir.Value, fmt: str) -> ir.Value:
    if fmt == "int8":
        return op.Mul(op.Sign(x), op.Floor(op.Add(op.Abs(x), scalar_like(0.5, x))))
    return opset19.Cast(opset19.Cast(x, to=ir.DataType.FLOAT8E4M3FN), to=FLOAT)


def _blocks(x: ir.Value, shape: list[int], block: int, fmt: str, mean: ir.Value | None = None) -> ir.Value:
    """quantize_blocks then dequantize: x of `shape` (B, H, N, D), float32 -> the values the codes
    stand for."""
    B, H, N, D = shape
    if mean is not None:
        x = op.Sub(x, mean)
    nb = -(-N // block)
    if nb * block != N:
        x = op.Pad(x, i64([0, 0, 0, 0, 0, 0, nb * block - N, 0]))
    groups = op.Reshape(x, i64([B, H, nb, block, D]))
    amax = op.ReduceMax(op.Abs(groups), i64([3, 4]), keepdims=1)
    scale = op.Div(op.Max(amax, scalar_like(quant_ref.MIN_AMAX, x)), scalar_like(quant_ref.QMAX[fmt], x))
    out = op.Reshape(op.Mul(_round(op.Div(groups, scale), fmt), scale), i64([B, H, nb * block, D]))
    if nb * block != N:
        out = op.Slice(out, i64([0]), i64([N]), i64([2]))
    return out


def _channels_fp8(v: ir.Value, fmt: str = "fp8") -> ir.Value:
    amax = op.ReduceMax(op.Abs(v), i64([2]), keepdims=1)
    scale = op.Div(op.Max(amax, scalar_like(quant_ref.MIN_AMAX, v)), scalar_like(quant_ref.QMAX[fmt], v))
    return op.Mul(_round(op.Div(v, scale), fmt), scale)


def _smoothing_mean(k: ir.Value, n: int) -> ir.Value:
    """quant_ref.smoothing_mean of float32 k (B, H, n, D), kept as (B, H, 1, D)."""
    rows = quant_ref.smoothing_rows(n)
    sample = k if rows.numel() == n else op.Gather(k, i64(rows.tolist()), axis=2)
    return op.ReduceMean(sample, i64([2]), keepdims=1)


def fake_quantize_qkv(q: ir.Value, k: ir.Value, v: ir.Value, quant: str, block_m: int, block_n: int, opset: int):
    """(q, k, v) as the kernels see them in `quant` mode, float32 (K comes back smoothed)."""
    mode = QuantMode.parse(quant, "fake_quantize_qkv: quant")
    if mode is QuantMode.NONE:
        raise ValueError("fake_quantize_qkv: quant 'none' has nothing to quantize")
    fmt = mode.qk_format
    if (fmt == "fp8" or mode.pv_is_fp8) and opset < FP8_OPSET:
        raise ValueError(f"quant {quant!r} needs float8 (ONNX opset >= {FP8_OPSET}); the export asked for opset {opset}")
    q_shape, kv_shape = dims(q), dims(k)
    q, k, v = (op.Cast(x, to=FLOAT) for x in (q, k, v))
    q_hat = _blocks(q, q_shape, block_m, fmt)
    k_hat = _blocks(k, kv_shape, block_n, fmt, mean=_smoothing_mean(k, kv_shape[2]))
    if mode.pv_is_8bit:
        v = _channels_fp8(v, mode.pv_format)
    return q_hat, k_hat, v


def smoothing_bias(q: ir.Value, k: ir.Value, q_shape: list[int], kv_shape: list[int]) -> ir.Value:
    """q . smoothing_mean(K) per query row, (B, H, Nq, 1) float32 (quant_ref.smoothing_bias)."""
    q, k = op.Cast(q, to=FLOAT), op.Cast(k, to=FLOAT)
    mean = repeat_heads(_smoothing_mean(k, kv_shape[2]), [kv_shape[0], kv_shape[1], 1, kv_shape[3]],
                        q_shape[1])
    return op.MatMul(q, op.Transpose(mean, perm=[0, 1, 3, 2]))


def fp8_p_attention(q: ir.Value, k: ir.Value, v: ir.Value, tokens: ir.Value, scale: float, block_n: int,
                    q_shape: list[int], kv_shape: list[int], softcap: float = 0.0,
                    score_bias: ir.Value | None = None, p_format: str = "fp8") -> ir.Value:
    """softmax(cap(q k^T * scale), masked by tokens) v with P rounded to e4m3 per row and group of
    block_n keys (float32 q/k/v, tokens bool broadcastable to (B, H, Nq, Nk)); rows with no key
    give NaN or 0 (the caller zeroes them)."""
    B, H, Nq, _ = q_shape
    Nk = kv_shape[2]
    k, v = repeat_heads(k, kv_shape, H), repeat_heads(v, kv_shape, H)
    s = op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2]))
    if score_bias is not None:
        s = op.Add(s, score_bias)
    s = op.Mul(s, scalar_like(scale, q))
    if softcap:
        s = op.Mul(op.Tanh(op.Div(s, scalar_like(softcap, q))), scalar_like(softcap, q))
    ninf = scalar_like(float("-inf"), q)
    zero = scalar_like(0.0, q)
    s = op.Where(tokens, s, ninf)
    m = op.ReduceMax(s, i64([-1]), keepdims=1)
    m = op.Where(op.IsInf(m), zero, m)
    nb = -(-Nk // block_n)
    padded = op.Pad(s, i64([0, 0, 0, 0, 0, 0, 0, nb * block_n - Nk]), ninf) if nb * block_n != Nk else s
    groups = op.Reshape(padded, i64([B, H, Nq, nb, block_n]))
    gmax = op.ReduceMax(groups, i64([-1]), keepdims=1)
    live = op.Not(op.IsInf(gmax))
    gref = op.Where(live, gmax, zero)
    qmax = scalar_like(quant_ref.QMAX[p_format], q)
    p = _round(op.Mul(op.Exp(op.Sub(groups, gref)), qmax), p_format)
    weight = op.Where(live, op.Div(op.Exp(op.Sub(gref, op.Unsqueeze(m, i64([-1])))), qmax), zero)
    p = op.Reshape(op.Mul(p, weight), i64([B, H, Nq, nb * block_n]))
    if nb * block_n != Nk:
        p = op.Slice(p, i64([0]), i64([Nk]), i64([3]))
    l = op.ReduceSum(op.Where(tokens, op.Exp(op.Sub(s, m)), zero), i64([-1]), keepdims=1)
    return op.Div(op.MatMul(p, v), l)
