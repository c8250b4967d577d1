"""Pooled remainder (PSA, Pyramid Sparse Attention): the key blocks a query block does not keep are
attended at low resolution instead of dropped.

Block-sparse attention drops the softmax mass of every key block outside a query block's kept set;
at high sparsity that lost mass is most of the error. PSA keeps it approximately: each dropped key
block j is replaced by one pooled key and value, the means k_j, v_j of its n_j tokens, whose
score gets + log(n_j) (n_j equal keys of score s carry n_j * exp(s) of mass), and these pooled
keys join the kept blocks' tokens in one softmax. For a query row t of query block i, with kept
set K_i:

    out_t = ( sum_{u in blocks K_i} e^{s_tu} v_u + sum_{j not in K_i} n_j e^{scale q_t . k_j} v_j ) / Z_t

(Z_t the sum of the same weights). Computed as two partial attentions merged exactly by their
log-sum-exp (vsopt.core.ring.merge_partials): the kept blocks by the block-sparse kernel
(vsopt.block_sparse_attention_lse), the pooled remainder by a small dense attention over the KB
pooled keys with the kept blocks masked out (masked row: lse -inf, nothing added). Not inside the
kernel: the remainder runs as separate ATen ops (pool, matmul, logsumexp, matmul) and the merge
as a few elementwise ops, on the GPU as on the CPU; a fused kernel walking the pooled keys after
the kept blocks is not written (kernels/ is unchanged). Only one pyramid level (block means).

Quantized heads: the kernel's K smoothing shifts its lse by scale * q . smoothing_mean(k), which is added
back before the merge (as ring attention does); the pooled scores are taken unquantized.

Written once against ring.Emitter: semantics runs it eagerly (the meaning of a plan),
passes/lower_plan emits the same ops into the graph.
"""
from __future__ import annotations

import enum
import math
from typing import Any

import torch

from vsopt.core.lse import merge_partials, shape_of, sparse_partial
from vsopt.kernels.block_mask.reference import block_sizes  # tokens per block, the last one ragged

aten = torch.ops.aten
NEG_INF = float("-inf")


class Remainder(str, enum.Enum):
    """What a sparse head does with the key blocks it does not keep."""

    DROP = "drop"  # nothing: plain block-sparse attention
    POOLED = "pooled"  # attended once each, mean-pooled, in the same softmax (PSA)


def pooled_blocks(em, x, block_n: int, sizes) -> Any:
    """Mean of x (B, H, N, D) over each key block: float32 (B, H, KB, D), as emitted ops (the
    kernels' block_mask.reference.pool_blocks computes the same eagerly). `sizes`: block_sizes as
    an emitted constant (KB, 1)."""
    B, H, N, D = shape_of(x)
    kb = -(-N // block_n)
    xf = em.op(aten._to_copy.default, x, dtype=torch.float32)
    if kb * block_n != N:
        xf = em.op(aten.constant_pad_nd.default, xf, [0, 0, 0, kb * block_n - N])
    sums = em.op(aten.sum.dim_IntList, em.op(aten.reshape.default, xf, [B, H, kb, block_n, D]), [3])
    return em.op(aten.div.Tensor, sums, sizes)


def pooled_remainder(em, q, k, v, masks, scale: float, block_m: int, block_n: int) -> tuple[Any, Any]:
    """The pooled remainder's partial attention: (out float32 (B, H, Nq, D), lse float32 (B, H, Nq),
    -inf where a row's query block keeps every key block). q (B, H, Nq, D); k, v (B, Hkv, Nk, D);
    masks bool (B or 1, H, QB, KB), True = kept (attended at full resolution, not pooled here)."""
    B, H, Nq, _ = shape_of(q)
    Hkv, Nk = shape_of(k)[1], shape_of(k)[2]
    sizes = block_sizes(Nk, block_n)
    size_col = em.const("pool_sizes", sizes[:, None])
    kbar, vbar = pooled_blocks(em, k, block_n, size_col), pooled_blocks(em, v, block_n, size_col)
    if Hkv != H:  # one pooled key/value head per query head (GQA)
        kbar = em.op(aten.repeat_interleave.self_int, kbar, H // Hkv, 1)
        vbar = em.op(aten.repeat_interleave.self_int, vbar, H // Hkv, 1)
    qf = em.op(aten._to_copy.default, q, dtype=torch.float32)
    scores = em.op(aten.mul.Tensor, em.op(aten.matmul.default, qf, em.op(aten.transpose.int, kbar, 2, 3)), float(scale))
    scores = em.op(aten.add.Tensor, scores, em.const("pool_log_sizes", sizes.log()))  # + log n_j
    rows = em.op(aten.repeat_interleave.self_int, masks, block_m, 2)                   # kept, per query row
    rows = em.op(aten.slice.Tensor, rows, 2, 0, Nq)
    scores = em.op(aten.masked_fill.Scalar, scores, rows, NEG_INF)
    lse = em.op(aten.logsumexp.default, scores, [-1])
    m = em.op(aten.unsqueeze.default, em.op(aten.clamp_min.default, lse, -1e30), -1)   # -inf rows: weights 0
    p = em.op(aten.exp.default, em.op(aten.sub.Tensor, scores, m))
    return em.op(aten.matmul.default, p, vbar), lse


def pooled_attention(em, q, k, v, masks, kv_indices, kv_counts, scale: float, block_m: int, block_n: int,
                     quant: str) -> Any:
    """Block-sparse attention over the kept blocks (masks, and their table kv_indices/kv_counts)
    plus the pooled remainder, merged: float32 (B, H, Nq, D)."""
    kept = sparse_partial(em, q, k, v, kv_indices, kv_counts, scale, block_m, block_n, quant)
    out, _ = merge_partials(em, [kept, pooled_remainder(em, q, k, v, masks, scale, block_m, block_n)])
    return out


def reference_pooled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, scale: float,
                               block_m: int, block_n: int, size_bias: bool = True) -> torch.Tensor:
    """The pooled softmax written directly, in float64 (tests): per query row, the kept blocks'
    tokens and one pooled key per dropped block (its mean, score + log of its size) in one softmax.
    size_bias False leaves the log-size out (what the bias is for, tests show)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Nq, _ = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    Nk = k.shape[2]
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float64)
    kb = math.ceil(Nk / block_n)
    for b in range(B):
        for h in range(H):
            m = masks[min(b, masks.shape[0] - 1), h]
            for t in range(Nq):
                keep = m[t // block_m]
                logits, values = [], []
                for j in range(kb):
                    blk = slice(j * block_n, min(Nk, (j + 1) * block_n))
                    if keep[j]:
                        logits.append(scale * k[b, h, blk] @ q[b, h, t])
                        values.append(v[b, h, blk])
                    else:
                        n = blk.stop - blk.start
                        bias = math.log(n) if size_bias else 0.0
                        logits.append((scale * k[b, h, blk].mean(0) @ q[b, h, t] + bias).reshape(1))
                        values.append(v[b, h, blk].mean(0, keepdim=True))
                w = torch.softmax(torch.cat(logits), 0)
                out[b, h, t] = w @ torch.cat(values)
    return out
