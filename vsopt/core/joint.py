"""Split joint attention: a joint text + video site whose text part the block-sparse kernel cannot
take (an attention mask over the text, or a data-dependent text length), computed exactly as

    video rows x video keys   the plan: per launch group, vsopt.block_sparse_attention_lse over the
                              video tokens only (each head's order, its video x video block mask)
    video rows x text keys    dense, under the model's mask, in float32 (lse.dense_lse)
    -> merged by log-sum-exp (lse.merge_partials)
    text rows x every key     dense (global), under the model's mask: vsopt.attention

so text rows and columns are global whatever the head's sparsity, and the model's mask applies
wherever text is involved. The video x video part of the mask must be all-true (boolean) or all
zero (additive): the kernel takes no per-token mask there. Whoever builds the split proves it
(passes/mask_bounds.py from the graph, semantics.check_video_mask on values).

The sequence is [text_before][video_tokens][text_after]; text_before and the video size are
static, text_after may be symbolic (Mochi cuts the text to its unpadded length). What each head
does over the video tokens is a JointPlan, made by vsopt.core.semantics.joint_plan (the meaning
of a plan lives there); this module only computes it, against an Emitter (EagerEmitter for
semantics and tests, the lowering pass's emitter for graph nodes: the same ops either way).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch

from vsopt.core import ops as _ops  # noqa: F401  (registers torch.ops.vsopt.*)
from vsopt.core.dynamic import DynamicSpec
from vsopt.core.lse import Emitter, dense_lse, gather_heads, merge_partials, sparse_partial
from vsopt.core.plan import Quant

aten = torch.ops.aten
vsopt = torch.ops.vsopt


@dataclass(frozen=True)
class JointGroup:
    """Heads (query head indices) sharing one kernel launch over the video tokens: precision,
    blocks, and either static masks (len(heads), QBv, KBv) in the heads' orders, or a dynamic rule."""

    heads: tuple[int, ...]
    quant: Quant
    block_m: int
    block_n: int
    masks: torch.Tensor | None
    dynamic: DynamicSpec | None = None


@dataclass(frozen=True)
class JointPlan:
    """What a split joint site runs: text_before text tokens, then `video` video tokens (then the
    rest of the sequence, text), `heads` query heads; groups cover every head once; perm (H or 1,
    video) gathers the video tokens into the heads' orders (None: model order); skipped heads
    output 0 in every row."""

    site_id: str
    text_before: int
    video: int
    heads: int
    groups: tuple[JointGroup, ...]
    perm: torch.Tensor | None = None
    skipped: tuple[int, ...] = ()


def _val(x):
    return x.meta["val"] if hasattr(x, "meta") else x


def _shape(x) -> tuple:
    return tuple(_val(x).shape)


def _split_seq(em: Emitter, x, dim: int, tb: int, nv: int) -> tuple[Any, Any, Any]:
    """x's (text before, video, text after) along `dim` (None where empty). A static length is
    sliced; a symbolic one is split with sizes [tb, nv, rest], so that the video piece has the
    static size nv (a slice of a symbolic length would only be min(nv, length))."""
    n = _shape(x)[dim]
    if isinstance(n, int):
        parts = (em.op(aten.slice.Tensor, x, dim, 0, tb) if tb else None, em.op(aten.slice.Tensor, x, dim, tb, tb + nv),
                 em.op(aten.slice.Tensor, x, dim, tb + nv, n) if n > tb + nv else None)
        return parts
    rest = em.op(operator.sub, em.op(aten.sym_size.int, x, dim), tb + nv)
    sizes = ([tb] if tb else []) + [nv, rest]
    pieces = em.op(aten.split_with_sizes.default, x, sizes, dim)
    got = [em.op(operator.getitem, pieces, i) for i in range(len(sizes))]
    return (got[0], got[1], got[2]) if tb else (None, got[0], got[1])


def _mask4(em: Emitter, mask):
    """The mask with 4 dims (leading ones added): broadcastable to (B, H, Nq, Nk)."""
    while mask is not None and len(_shape(mask)) < 4:
        mask = em.op(aten.unsqueeze.default, mask, 0)
    return mask


def _take(em: Emitter, mask, dim: int, tb: int, nv: int, which: tuple[int, ...]):
    """Rows (dim 2) or columns (dim 3) of a 4-d mask: the pieces `which` of (text before, video,
    text after), concatenated; a broadcast (size 1) axis stays as it is."""
    if mask is None or _shape(mask)[dim] == 1:
        return mask
    split = _split_seq(em, mask, dim, tb, nv)
    parts = [split[i] for i in which if split[i] is not None]
    return parts[0] if len(parts) == 1 else em.op(aten.cat.default, parts, dim)


def _cat(em: Emitter, parts, dim: int = 2):
    parts = [p for p in parts if p is not None]
    return parts[0] if len(parts) == 1 else em.op(aten.cat.default, parts, dim)


def joint_attention(jp: JointPlan, q, k, v, mask, scale: float, em: Emitter, cache_key: str = "",
                    reuse: bool = True):
    """The site's output (B, H, N, Dv) in q's dtype, model order. q (B, H, N, D), k and v
    (B, Hkv, N, D[v]) in model order; mask None, or boolean (True = keep) / additive,
    broadcastable to (B, H, N, N). cache_key: prefix of the dynamic heads' mask-reuse keys;
    reuse=False computes dynamic masks afresh (the meaning at one step)."""
    tb, nv = jp.text_before, jp.video
    dtype = _val(q).dtype
    mask = _mask4(em, mask)
    H, Hkv = jp.heads, _shape(k)[1]
    (q0, qv, q1), (k0, kv, k1), (v0, vv, v1) = (_split_seq(em, x, 2, tb, nv) for x in (q, k, v))
    if upper_bound(_shape(q)[2]) is not None:
        # static pieces of a data-dependent buffer have data-dependent strides, which Inductor's views
        # (before a bmm: the CPU reference of the kernel) guard on: each piece gets a buffer of its own
        qv, kv, vv = (em.op(aten.clone.default, x, memory_format=torch.contiguous_format) for x in (qv, kv, vv))
    if Hkv != H:   # one key/value head per query head (orders and launch groups are per query head)
        kv, vv = (em.op(aten.repeat_interleave.self_int, x, H // Hkv, 1) for x in (kv, vv))
    out_v, lse_v = _video_part(jp, qv, kv, vv, scale, em, cache_key, reuse)
    if k0 is not None or k1 is not None:
        kt, vt = _cat(em, (k0, k1)), _cat(em, (v0, v1))
        if Hkv != H:
            kt, vt = (em.op(aten.repeat_interleave.self_int, x, H // Hkv, 1) for x in (kt, vt))
        m = _take(em, _take(em, mask, 2, tb, nv, (1,)), 3, tb, nv, (0, 2))
        kt, vt, m = _bounded_keys(em, kt, vt, m)
        out_v, _ = merge_partials(em, [(out_v, lse_v), dense_lse(em, qv, kt, vt, m, scale)])
    rows = []
    if q0 is not None:
        rows.append(_text_rows(em, q0, k, v, _take(em, mask, 2, tb, nv, (0,)), scale))
    rows.append(em.op(aten._to_copy.default, out_v, dtype=dtype))
    if q1 is not None:
        rows.append(_text_rows(em, q1, k, v, _take(em, mask, 2, tb, nv, (2,)), scale))
    out = _cat(em, rows)
    if jp.skipped:
        keep = torch.ones(1, H, 1, 1, dtype=dtype)
        keep[:, list(jp.skipped)] = 0
        out = em.op(aten.mul.Tensor, out, em.const("joint_keep", keep))
    return out


def upper_bound(size) -> int | None:
    """The largest value a data-dependent size can take (its ShapeEnv's range: nonzero of n
    elements gives at most n), or None: a static size, or no finite bound."""
    if isinstance(size, int) or not isinstance(size, torch.SymInt):
        return None
    node = size.node
    if not hasattr(node, "shape_env") or node.shape_env is None:
        return None
    upper = node.shape_env.bound_sympy(node.expr).upper
    return int(upper) if getattr(upper, "is_Integer", False) else None


def _bounded_keys(em: Emitter, k, v, mask):
    """The text keys of data-dependent count n padded to their static bound U, with a boolean mask
    keeping the first n: the video rows x text keys product then has static sizes, which Inductor's
    CPU bmm lowering needs (it guards on a data-dependent size, Eq(u0, 1), and refuses to compile).
    Exact: padded keys are dropped by the mask, as an empty text (n = 0) is. Unchanged where the
    count is static, has no bound, or the mask is additive (kept as it was, unpadded)."""
    n = _shape(k)[2]
    bound = upper_bound(n)
    if bound is None or (mask is not None and (_val(mask).dtype != torch.bool and _shape(mask)[3] != 1)):
        return k, v, mask
    count = em.op(aten.sym_size.int, k, 2)
    pad = em.op(operator.sub, bound, count)
    k, v = (_pad_axis(em, x, 2, pad) for x in (k, v))
    # the first `count` keys kept: ones then zeros (a comparison with the symbolic count would need its value)
    valid = em.op(aten.cat.default, [em.op(aten.new_ones.default, k, [count], dtype=torch.bool),
                                     em.op(aten.new_zeros.default, k, [pad], dtype=torch.bool)])
    valid = em.op(aten.view.default, valid, [1, 1, 1, bound])
    if mask is None:
        return k, v, valid
    if _val(mask).dtype == torch.bool:
        if _shape(mask)[3] != 1:
            mask = _pad_axis(em, mask, 3, pad)
        return k, v, em.op(aten.logical_and.default, mask, valid)
    neg = em.op(aten.where.ScalarOther, valid, em.op(aten.zeros_like.default, valid, dtype=_val(mask).dtype),
                float("-inf"))
    return k, v, em.op(aten.add.Tensor, mask, neg)


def _pad_axis(em: Emitter, x, dim: int, pad):
    """x with `pad` zeros (False) after it along `dim`: a cat with new zeros, as constant_pad_nd's
    meta takes no symbolic pad."""
    shape = list(_shape(x))
    shape[dim] = pad
    return em.op(aten.cat.default, [x, em.op(aten.new_zeros.default, x, shape)], dim)


def _text_rows(em: Emitter, q, k, v, mask, scale: float):
    """Text query rows over every key, dense under their rows of the mask."""
    return em.op(vsopt.attention.default, q, k, v, mask, float(scale), False)


def _video_part(jp: JointPlan, q, k, v, scale: float, em: Emitter, cache_key: str, reuse: bool):
    """Video rows over video keys under the plan: (out float32 (B, H, Nv, Dv), lse (B, H, Nv)), model order."""
    perm = None
    if jp.perm is not None:
        perm = em.const("joint_perm", jp.perm)
        q, k, v = (em.op(vsopt.permute_tokens.default, x, perm) for x in (q, k, v))
    outs, lses, order = [], [], []
    for g in jp.groups:
        qg, kg, vg = q, k, v
        if len(jp.groups) > 1:
            sel = em.const("joint_heads", torch.tensor(g.heads, dtype=torch.int64))
            qg, kg, vg = (em.op(aten.index_select.default, x, 1, sel) for x in (q, k, v))
        if g.dynamic is None:
            idx, counts = vsopt.mask_to_table(g.masks[None])
            width = max(1, int(counts.max()))   # no wider rows than the fullest one
            idx, counts = em.const("joint_kv_indices", idx[..., :width].contiguous()), em.const("joint_kv_counts", counts)
        else:
            spec = g.dynamic
            dm = em.op(vsopt.dynamic_block_mask.default, qg, kg, float(scale), g.block_m, g.block_n, spec.method.value,
                       spec.value, spec.reuse_steps if reuse else 0, f"{cache_key}/heads{g.heads[0]}")
            table = em.op(vsopt.mask_to_table.default, dm)
            idx, counts = em.op(operator.getitem, table, 0), em.op(operator.getitem, table, 1)
        o, lse = sparse_partial(em, qg, kg, vg, idx, counts, scale, g.block_m, g.block_n, g.quant)
        outs.append(o)
        lses.append(lse)
        order += g.heads
    return gather_heads(em, outs, lses, order, perm, "joint_head_order")


__all__ = ["JointGroup", "JointPlan", "joint_attention"]
