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
import sys
from dataclasses import dataclass
from typing import Any

import torch

from vsopt.core import ops as _ops  # noqa: F401  (registers torch.ops.vsopt.*)
from vsopt.core.dynamic import DynamicSpec
from vsopt.core.lse import Emitter, dense_lse, merge_partials, smoothing_shift
from vsopt.core.plan import Quant

aten = torch.ops.aten
vsopt = torch.ops.vsopt
END = sys.maxsize   # aten.slice's "to the end", also for a symbolic length


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


def _has_rows(n, start: int) -> bool:
    """Whether a sequence of length n (an int or a symbolic size) may have tokens from `start` on."""
    return not isinstance(n, int) or n > start


def _seq(em: Emitter, x, dim: int, start: int, stop: int):
    return em.op(aten.slice.Tensor, x, dim, start, stop)


def _mask4(em: Emitter, mask):
    """The mask with 4 dims (leading ones added): broadcastable to (B, H, Nq, Nk)."""
    while mask is not None and len(_shape(mask)) < 4:
        mask = em.op(aten.unsqueeze.default, mask, 0)
    return mask


def _take(em: Emitter, mask, dim: int, pieces: list[tuple[int, int]]):
    """Rows (dim 2) or columns (dim 3) of a 4-d mask: the pieces, concatenated; a broadcast (size 1)
    axis stays as it is."""
    if mask is None or _shape(mask)[dim] == 1:
        return mask
    parts = [_seq(em, mask, dim, s, e) for s, e in pieces]
    return parts[0] if len(parts) == 1 else em.op(aten.cat.default, parts, dim)


def _text_pieces(jp: JointPlan, n) -> list[tuple[int, int]]:
    pieces = [(0, jp.text_before)] if jp.text_before else []
    if _has_rows(n, jp.text_before + jp.video):
        pieces.append((jp.text_before + jp.video, END))
    return pieces


def _cat_seq(em: Emitter, x, pieces):
    parts = [_seq(em, x, 2, s, e) for s, e in pieces]
    return parts[0] if len(parts) == 1 else em.op(aten.cat.default, parts, 2)


def joint_attention(jp: JointPlan, q, k, v, mask, scale: float, em: Emitter, cache_key: str = "",
                    reuse: bool = True):
    """The site's output (B, H, N, Dv) in q's dtype, model order. q (B, H, N, D), k and v
    (B, Hkv, N, D[v]) in model order; mask None, or boolean (True = keep) / additive,
    broadcastable to (B, H, N, N). cache_key: prefix of the dynamic heads' mask-reuse keys;
    reuse=False computes dynamic masks afresh (the meaning at one step)."""
    tb, nv = jp.text_before, jp.video
    n = _shape(q)[2]
    dtype = _val(q).dtype
    mask = _mask4(em, mask)
    text = _text_pieces(jp, n)
    H, Hkv = jp.heads, _shape(k)[1]
    qv, kv, vv = (_seq(em, x, 2, tb, tb + nv) for x in (q, k, v))
    if Hkv != H:   # one key/value head per query head (orders and launch groups are per query head)
        kv, vv = (em.op(aten.repeat_interleave.self_int, x, H // Hkv, 1) for x in (kv, vv))
    out_v, lse_v = _video_part(jp, qv, kv, vv, scale, em, cache_key, reuse)
    if text:
        kt, vt = (_cat_seq(em, x, text) for x in (k, v))
        if Hkv != H:
            kt, vt = (em.op(aten.repeat_interleave.self_int, x, H // Hkv, 1) for x in (kt, vt))
        m = _take(em, _take(em, mask, 2, [(tb, tb + nv)]), 3, text)
        out_v, _ = merge_partials(em, [(out_v, lse_v), dense_lse(em, qv, kt, vt, m, scale)])
    rows = []
    if tb:
        rows.append(_text_rows(em, q, k, v, mask, scale, 0, tb))
    rows.append(em.op(aten._to_copy.default, out_v, dtype=dtype))
    if _has_rows(n, tb + nv):
        rows.append(_text_rows(em, q, k, v, mask, scale, tb + nv, END))
    out = rows[0] if len(rows) == 1 else em.op(aten.cat.default, rows, 2)
    if jp.skipped:
        keep = torch.ones(1, H, 1, 1, dtype=dtype)
        keep[:, list(jp.skipped)] = 0
        out = em.op(aten.mul.Tensor, out, em.const("joint_keep", keep))
    return out


def _text_rows(em: Emitter, q, k, v, mask, scale: float, start: int, stop: int):
    """Text query rows [start, stop) over every key, dense under their rows of the mask."""
    return em.op(vsopt.attention.default, _seq(em, q, 2, start, stop), k, v, _take(em, mask, 2, [(start, stop)]),
                 float(scale), False)


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
        res = em.op(vsopt.block_sparse_attention_lse.default, qg, kg, vg, idx, counts, float(scale), g.block_m,
                    g.block_n, g.quant.value)
        o, lse = em.op(operator.getitem, res, 0), em.op(operator.getitem, res, 1)
        if g.quant is not Quant.NONE:
            lse = em.op(aten.add.Tensor, lse, smoothing_shift(em, qg, kg, scale))
        outs.append(em.op(aten._to_copy.default, o, dtype=torch.float32))
        lses.append(lse)
        order += g.heads
    out = outs[0] if len(outs) == 1 else em.op(aten.cat.default, outs, 1)
    lse = lses[0] if len(lses) == 1 else em.op(aten.cat.default, lses, 1)
    if order != sorted(order):
        inverse = em.const("joint_head_order", torch.argsort(torch.tensor(order, dtype=torch.int64)))
        out, lse = em.op(aten.index_select.default, out, 1, inverse), em.op(aten.index_select.default, lse, 1, inverse)
    if perm is not None:
        out = em.op(vsopt.unpermute_tokens.default, out, perm)
        lse = em.op(aten.squeeze.dim, em.op(vsopt.unpermute_tokens.default, em.op(aten.unsqueeze.default, lse, -1),
                                            perm), -1)
    return out, lse


__all__ = ["END", "JointGroup", "JointPlan", "joint_attention"]
