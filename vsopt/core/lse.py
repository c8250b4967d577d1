"""Partial attentions and their exact merge by log-sum-exp, written once against an Emitter.

An attention over a key set K can be computed as parts over disjoint K_1, ..., K_n, each giving
(out_i, lse_i) with lse_i the natural-log log-sum-exp of the row's scaled scores over K_i; then

    lse = logsumexp_i lse_i,     out = sum_i exp(lse_i - lse) out_i                (merge_partials)

Ring attention (vsopt/core/ring.py: one part per key shard) and split joint attention
(vsopt/core/joint.py: the video keys through the block-sparse kernel, the text keys dense under
the model's mask) both merge this way. The code is written against an Emitter: EagerEmitter runs
the ops now (the meaning, tests, GPU checks), a pass's emitter inserts the same ops as graph nodes.
"""
from __future__ import annotations

import operator
from typing import Any, Protocol, Sequence

import torch

from vsopt.kernels.quant import reference as quant_ref
from vsopt.kernels.spec import QuantMode

aten = torch.ops.aten
NEG_INF = float("-inf")


class Emitter(Protocol):
    """Where a computation goes: op(target, *args, **kwargs) runs or records one op call;
    const(label, tensor) is a constant input (a buffer of the graph)."""

    def op(self, target, *args, **kwargs) -> Any: ...

    def const(self, label: str, value: torch.Tensor) -> Any: ...


class EagerEmitter:
    """Runs the ops now, constants on `device`."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def op(self, target, *args, **kwargs):
        return target(*args, **kwargs)

    def const(self, label: str, value: torch.Tensor):
        return value.to(self.device)


def merge_partials(em: Emitter, parts: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
    """Merge partial attentions (out float32 (B, H, N, D), lse float32 (B, H, N)) over disjoint key
    sets: out = sum_i exp(lse_i - lse) out_i, lse = logsumexp_i lse_i. Rows empty in every part stay
    0 with lse -inf (no NaN)."""
    out, lse = parts[0]
    for o2, l2 in parts[1:]:
        m = em.op(aten.clamp_min.default, em.op(aten.maximum.default, lse, l2), -1e30)
        w1 = em.op(aten.unsqueeze.default, em.op(aten.exp.default, em.op(aten.sub.Tensor, lse, m)), -1)
        w2 = em.op(aten.unsqueeze.default, em.op(aten.exp.default, em.op(aten.sub.Tensor, l2, m)), -1)
        total = em.op(aten.add.Tensor, w1, w2)   # in [1, 2] unless both parts are empty (then 0)
        num = em.op(aten.add.Tensor, em.op(aten.mul.Tensor, out, w1), em.op(aten.mul.Tensor, o2, w2))
        out = em.op(aten.div.Tensor, num, em.op(aten.clamp_min.default, total, 1e-30))
        lse = em.op(aten.add.Tensor, m, em.op(aten.squeeze.dim, em.op(aten.log.default, total), -1))
    return out, lse


def smoothing_shift(em: Emitter, q, kp, scale: float):
    """scale * q . smoothing_mean(k_piece) per row (B, H, Nq): what the quantized kernels' K smoothing
    took off the scores of this piece (softmax ignores it within a piece, a merge across pieces does
    not: add it back to the piece's lse). The same sampled rows as the kernel (quant_ref.smoothing_rows)."""
    rows = em.const("smoothing_rows", quant_ref.smoothing_rows(shape_of(kp)[2]))
    sample = em.op(aten.index_select.default, kp, 2, rows)
    mean = em.op(aten.mean.dim, em.op(aten._to_copy.default, sample, dtype=torch.float32), [2], True)   # (B, H, 1, D)
    dots = em.op(aten.matmul.default, em.op(aten._to_copy.default, q, dtype=torch.float32),
                 em.op(aten.transpose.int, mean, 2, 3))
    return em.op(aten.mul.Tensor, em.op(aten.squeeze.dim, dots, -1), float(scale))


def shape_of(x) -> tuple[int, ...]:
    """The shape of a tensor, or of a graph node's value (what an Emitter's ops return)."""
    val = x.meta["val"] if hasattr(x, "meta") else x
    return tuple(val.shape)


def sparse_partial(em: Emitter, q, k, v, kv_indices, kv_counts, scale: float, block_m: int, block_n: int,
                   quant: QuantMode | str) -> tuple[Any, Any]:
    """One vsopt.block_sparse_attention_lse launch as a part to merge: (out float32 (B, H, Nq, Dv),
    lse float32 (B, H, Nq), -inf on rows visiting no block); a quantized launch's lse gets its
    smoothing shift back (smoothing_shift; k repeated to q's heads where it has fewer)."""
    quant = QuantMode.parse(quant)
    res = em.op(torch.ops.vsopt.block_sparse_attention_lse.default, q, k, v, kv_indices, kv_counts, float(scale),
                block_m, block_n, quant.value)
    out, lse = em.op(operator.getitem, res, 0), em.op(operator.getitem, res, 1)
    if quant is not QuantMode.NONE:
        H, Hkv = shape_of(q)[1], shape_of(k)[1]
        kk = k if H == Hkv else em.op(aten.repeat_interleave.self_int, k, H // Hkv, 1)
        lse = em.op(aten.add.Tensor, lse, smoothing_shift(em, q, kk, scale))
    return em.op(aten._to_copy.default, out, dtype=torch.float32), lse


def gather_heads(em: Emitter, outs: Sequence[Any], lses: Sequence[Any], order: Sequence[int], perm, label: str
                 ) -> tuple[Any, Any]:
    """The launch groups' (out, lse), computed for heads `order` (concatenated in that order) and
    in the token order `perm` (gather indices, a constant; None: the model's), back in head order
    and the model's token order. label: the name of the head-order constant."""
    out = outs[0] if len(outs) == 1 else em.op(aten.cat.default, list(outs), 1)
    lse = lses[0] if len(lses) == 1 else em.op(aten.cat.default, list(lses), 1)
    if list(order) != sorted(order):
        inverse = em.const(label, torch.argsort(torch.tensor(list(order), dtype=torch.int64)))
        out, lse = em.op(aten.index_select.default, out, 1, inverse), em.op(aten.index_select.default, lse, 1, inverse)
    if perm is not None:
        unpermute = torch.ops.vsopt.unpermute_tokens.default
        out = em.op(unpermute, out, perm)
        lse = em.op(aten.squeeze.dim, em.op(unpermute, em.op(aten.unsqueeze.default, lse, -1), perm), -1)
    return out, lse


def dense_lse(em: Emitter, q, k, v, mask, scale: float) -> tuple[Any, Any]:
    """Exact attention of q (B, H, Nq, D) over k, v (B, H, Nk, D) (one kv head per query head)
    under `mask` (None, or boolean True = keep / additive float, broadcastable to (B, H, Nq, Nk)),
    in float32, with its lse: (out (B, H, Nq, Dv), lse (B, H, Nq)). Rows with no kept key give 0
    and lse -inf. Plain ATen ops, so Nk may be a symbolic (data-dependent) size; memory
    B*H*Nq*Nk floats (meant for the few text keys of a joint attention)."""
    f32 = torch.float32
    s = em.op(aten.matmul.default, em.op(aten._to_copy.default, q, dtype=f32),  # (B, H, Nq, Nk)
              em.op(aten.transpose.int, em.op(aten._to_copy.default, k, dtype=f32), 2, 3))
    s = em.op(aten.mul.Tensor, s, float(scale))
    if mask is not None:
        if _dtype(mask) == torch.bool:
            s = em.op(aten.masked_fill.Scalar, s, em.op(aten.logical_not.default, mask), NEG_INF)
        else:
            s = em.op(aten.add.Tensor, s, em.op(aten._to_copy.default, mask, dtype=f32))
    # one -inf column more: the lse of an empty key set (a data-dependent text of length 0) is -inf,
    # and the reduction never sees an empty axis (nothing to guard on for a symbolic size)
    qf = em.op(aten._to_copy.default, q, dtype=f32)
    pad = em.op(aten.full_like.default, em.op(aten.slice.Tensor, qf, 3, 0, 1), NEG_INF)
    lse = em.op(aten.logsumexp.default, em.op(aten.cat.default, [s, pad], 3), [-1])
    finite = em.op(aten.where.self, em.op(aten.isinf.default, lse), em.op(aten.zeros_like.default, lse), lse)
    p = em.op(aten.exp.default, em.op(aten.sub.Tensor, s, em.op(aten.unsqueeze.default, finite, -1)))
    out = em.op(aten.matmul.default, p, em.op(aten._to_copy.default, v, dtype=f32))
    return out, lse


def _dtype(x) -> torch.dtype:
    val = x.meta["val"] if hasattr(x, "meta") else x
    return val.dtype


__all__ = ["EagerEmitter", "Emitter", "NEG_INF", "dense_lse", "merge_partials", "smoothing_shift"]
