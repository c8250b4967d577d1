"""The portable ONNX form: every vsopt op in standard ONNX ops, so any ONNX runtime runs it.

    block_sparse_attention  the block table -> a boolean token mask -> Attention (opset 23) or
                            MatMul / Softmax / MatMul; rows that visit no block give 0; the
                            quantized modes fake-quantize q/k/v as the reference does (fake_quant.py),
                            and the FP8 P V modes round P as it does (written out, no Attention op)
    permute_tokens          GatherElements (Gather when all heads share one order)
    unpermute_tokens        the inverse permutation (ScatterElements on the small index) + gather
    mask_to_table           TopK over a sort key, ReduceSum for the counts
    dynamic_block_mask      pooled scores (ReduceSum / MatMul / Softmax) -> TopK or sorted CumSum
                            -> ScatterElements, OR the diagonal; recomputed at every call
                            (reuse_steps is run-time state and is not kept)
    attention               attention.py

The math is kernels/*/reference.py's, the PyTorch path vsopt runs on the CPU, so the portable
form matches the eager optimized model to float rounding. The attention itself runs in the model's
dtype; the fake quantization in float32.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

from vsopt.core.dynamic import DynamicMethod
from vsopt.core.patterns import diagonal_blocks
from vsopt.kernels.block_mask import reference as mask_ref
from vsopt.kernels.spec import QuantMode

from .attention import attend, dense_attention
from .building import FLOAT, INT32, arange, blocks_to_tokens, const, dims, i64, rows_to_tokens, scalar_like, \
    table_to_blocks
from .fake_quant import fake_quantize_qkv, fp8_p_attention, smoothing_bias


def _permute(x: ir.Value, perm: ir.Value, heads: int) -> ir.Value:
    """y[:, h, i] = x[:, h, perm[h, i]] for perm (heads or 1, N)."""
    if heads == 1:
        return op.Gather(x, op.Reshape(perm, i64([-1])), axis=2)
    index = op.Expand(op.Unsqueeze(perm, i64([0, 3])), i64(dims(x)))
    return op.GatherElements(x, index, axis=2)


def _inverse(perm: ir.Value, P: int, N: int) -> ir.Value:
    """inv[h, perm[h, i]] = i (a permutation of each row of perm (P, N))."""
    positions = op.Expand(op.Unsqueeze(arange(N), i64([0])), i64([P, N]))
    return op.ScatterElements(op.ConstantOfShape(i64([P, N]), value=ir.tensor(np.zeros(1, np.int64))),
                              perm, positions, axis=1)


def _pool(x: ir.Value, shape: list[int], block: int) -> ir.Value:
    """Mean over each block of tokens of x of `shape` (B, H, N, D) (the ragged last block over the
    tokens it has), float32."""
    B, H, N, D = shape
    nb = -(-N // block)
    x = op.Cast(x, to=FLOAT)
    if nb * block != N:
        x = op.Pad(x, i64([0, 0, 0, 0, 0, 0, nb * block - N, 0]))
    sums = op.ReduceSum(op.Reshape(x, i64([B, H, nb, block, D])), i64([3]), keepdims=0)
    sizes = mask_ref.block_sizes(N, block).numpy().astype(np.float32)
    return op.Div(sums, const(sizes[:, None]))


def _scatter_true(shape: list[int], indices: ir.Value, updates: ir.Value) -> ir.Value:
    empty = op.ConstantOfShape(i64(shape), value=ir.tensor(np.zeros(1, np.bool_)))
    return op.ScatterElements(empty, indices, updates, axis=-1)


def portable_table(opset: int) -> dict:
    """The translation table (torch op overload -> ONNX function) of the portable form."""
    import torch

    def attention(q, k, v, attn_mask=None, scale: float = 1.0, is_causal: bool = False, softcap: float = 0.0):
        return dense_attention(q, k, v, attn_mask, scale, is_causal, softcap, opset=opset)

    def permute_tokens(x, perm):
        return _permute(x, perm, dims(perm)[0])

    def unpermute_tokens(x, perm):
        P, N = dims(perm)
        return _permute(x, _inverse(perm, P, N), P)

    def mask_to_table(mask):
        KB = dims(mask)[-1]
        key = op.Where(mask, arange(KB), op.Add(arange(KB), i64(KB)))   # selected blocks first, ascending
        ordered, _ = op.TopK(key, i64([KB]), axis=-1, largest=0, sorted=1)
        indices = op.Where(op.Less(ordered, i64(KB)), ordered, i64(0))
        return op.Cast(indices, to=INT32), op.ReduceSum(op.Cast(mask, to=INT32), i64([-1]), keepdims=0)

    def block_sparse_attention(q, k, v, kv_indices, kv_counts, scale: float, block_m: int, block_n: int,
                               quant: str = "none", softcap: float = 0.0):
        B, H, Nq, D = dims(q)
        Nk = dims(k)[2]
        Bt, _, QB, _ = dims(kv_indices)
        KB = -(-Nk // block_n)
        blocks = table_to_blocks(kv_indices, kv_counts, KB)
        tokens = blocks_to_tokens(blocks, [Bt, H, QB, KB], Nq, Nk, block_m, block_n)   # (Bt, H, Nq, Nk)
        q_shape, kv_shape = dims(q), dims(k)
        # under a cap, the q . c that K smoothing removes is added back (as the kernel does)
        bias = smoothing_bias(q, k, q_shape, kv_shape) if quant != "none" and softcap else None
        mode = QuantMode.parse(quant)
        if mode.pv_is_8bit:   # P rounded as the kernel rounds it: written out, in float32
            dtype = q.dtype
            qf, kf, vf = fake_quantize_qkv(q, k, v, quant, block_m, block_n, opset)
            out = op.Cast(fp8_p_attention(qf, kf, vf, tokens, scale, block_n, q_shape, kv_shape, float(softcap),
                                          bias, mode.pv_format), to=dtype)
        else:
            if quant != "none":
                dtype = q.dtype
                q, k, v = (op.Cast(x, to=dtype) for x in fake_quantize_qkv(q, k, v, quant, block_m, block_n, opset))
            out = attend(q, k, v, tokens, scale, opset, q_shape, kv_shape, softcap=float(softcap), score_bias=bias)
        # A row that visits no block (a skipped head) is 0, whatever the runtime's softmax of nothing is.
        live = rows_to_tokens(op.Greater(kv_counts, op.Constant(value=ir.tensor(np.zeros((), np.int32)))),
                              [Bt, H, QB], Nq, block_m)
        return op.Where(op.Unsqueeze(live, i64([-1])), out, scalar_like(0.0, out))

    def dynamic_block_mask(q, k, scale: float, block_m: int, block_n: int, method: str, value: float,
                           reuse_steps: int, cache_key: str):
        B, H, Nq, _ = dims(q)
        Nk = dims(k)[2]
        QB, KB = -(-Nq // block_m), -(-Nk // block_n)
        Hkv, D = dims(k)[1], dims(k)[3]
        qp, kp = _pool(q, dims(q), block_m), _pool(k, dims(k), block_n)
        if Hkv != H:   # grouped kv heads: each repeated for its query heads
            kp = op.Reshape(op.Expand(op.Unsqueeze(kp, i64([2])), i64([B, Hkv, H // Hkv, KB, D])), i64([B, H, KB, D]))
        logits = op.Mul(op.MatMul(qp, op.Transpose(kp, perm=[0, 1, 3, 2])), scalar_like(scale, qp))
        log_sizes = np.log(mask_ref.block_sizes(Nk, block_n).numpy().astype(np.float32))
        scores = op.Softmax(op.Add(logits, const(log_sizes)), axis=-1)
        shape = [B, H, QB, KB]
        if DynamicMethod(method) is DynamicMethod.TOP_K:
            kk = max(1, math.ceil(value * KB))
            _, idx = op.TopK(scores, i64([kk]), axis=-1, largest=1, sorted=1)
            ones = op.ConstantOfShape(i64([B, H, QB, kk]), value=ir.tensor(np.ones(1, np.bool_)))
            mask = _scatter_true(shape, idx, ones)
        else:
            vals, idx = op.TopK(scores, i64([KB]), axis=-1, largest=1, sorted=1)
            before = op.Sub(op.CumSum(vals, i64(-1)), vals)                 # mass ranked before each block
            limit = op.Sub(op.Mul(scalar_like(value, scores), op.ReduceSum(scores, i64([-1]), keepdims=1)),
                           scalar_like(1e-7, scores))
            mask = _scatter_true(shape, idx, op.Less(before, limit))
        if Nq == Nk:
            mask = op.Or(mask, const(diagonal_blocks(Nq, Nk, block_m, block_n).numpy()))
        return mask

    vs = torch.ops.vsopt
    return {vs.attention.default: attention, vs.permute_tokens.default: permute_tokens,
            vs.unpermute_tokens.default: unpermute_tokens, vs.mask_to_table.default: mask_to_table,
            vs.block_sparse_attention.default: block_sparse_attention,
            vs.dynamic_block_mask.default: dynamic_block_mask}

