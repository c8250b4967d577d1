"""Attention in standard ONNX: the opset-23 Attention op, or MatMul / Softmax / MatMul before 23.

Used for the dense vsopt.attention sites in both ONNX forms, and for the masked attention of the
portable form of block-sparse attention (the block table becomes a boolean token mask).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op
from onnxscript import opset23

from .building import BOOL, const, dims, first_output, repeat_heads, scalar_like

#: The first opset with the Attention operator.
ATTENTION_OPSET = 23


def attend(q: ir.Value, k: ir.Value, v: ir.Value, mask: ir.Value | None, scale: float, opset: int,
           q_shape: list[int], kv_shape: list[int], is_causal: bool = False, mask_is_bool: bool = True,
           softcap: float = 0.0, score_bias: ir.Value | None = None) -> ir.Value:
    """softmax(cap(q k^T * scale) [+ mask]) v for q of q_shape (B, H, Nq, D), k and v of kv_shape
    (B, Hkv, Nk, D); mask broadcastable to (B, H, Nq, Nk), bool (True = attend) or additive;
    cap(s) = softcap * tanh(s / softcap) when softcap > 0. Grouped kv heads are repeated first
    (every runtime takes that form). A capped attention is written out (Tanh before the mask)
    rather than as opset 23's Attention, whose softcap attribute applies after the mask bias.
    score_bias (B, H, Nq, 1), if given, is added to q k^T before the scale (K smoothing's q . mean
    under a cap)."""
    H = q_shape[1]
    k, v = repeat_heads(k, kv_shape, H), repeat_heads(v, kv_shape, H)
    if opset >= ATTENTION_OPSET and not softcap and score_bias is None:
        outs = opset23.Attention(q, k, v, mask, scale=float(scale), is_causal=int(bool(is_causal))) \
            if mask is not None else opset23.Attention(q, k, v, scale=float(scale), is_causal=int(bool(is_causal)))
        return first_output(outs)
    scores = op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2]))
    if score_bias is not None:
        scores = op.Add(scores, op.CastLike(score_bias, q))
    scores = op.Mul(scores, scalar_like(scale, q))
    if softcap:
        scores = op.Mul(op.Tanh(op.Div(scores, scalar_like(softcap, q))), scalar_like(softcap, q))
    if is_causal:
        nq, nk = q_shape[2], kv_shape[2]
        causal = np.tril(np.ones((nq, nk), dtype=bool))   # torch's is_causal: the upper-left triangle
        scores = op.Where(const(causal), scores, scalar_like(float("-inf"), q))
    if mask is not None:
        if mask_is_bool:
            scores = op.Where(mask, scores, scalar_like(float("-inf"), q))
        else:
            scores = op.Add(scores, op.CastLike(mask, q))
    return op.MatMul(op.Softmax(scores, axis=-1), v)


def dense_attention(q, k, v, attn_mask=None, scale: float = 1.0, is_causal: bool = False, softcap: float = 0.0, *,
                    opset: int):
    """vsopt.attention (exact dense attention) in standard ops."""
    return attend(q, k, v, attn_mask, scale, opset, dims(q), dims(k), is_causal=is_causal,
                  mask_is_bool=attn_mask is None or attn_mask.dtype == BOOL, softcap=float(softcap))

