"""What SoftmaxAttentionRule.rewrite emits, as typed records, and the emitters that build it.

A matched softmax attention is rebuilt from the sources of its operands, in the canonical
(B, H, N, D) layout vsopt.attention takes, and its result laid out again as the value matmul's
output was:

    q4 = emit_canonical(q)  k4 = emit_canonical(k)  v4 = emit_canonical(v)   (reshape/permute/expand)
    m4 = score_mask.emit_mask(mask)                     (broadcastable to (B, H, Nq, Nk), or None)
    out = vsopt.attention(q4, k4, v4, m4, scale, False)
    out = score_mask.emit_empty_rows(out, m4, ...)      (masked rows as the original gives them)
    emit_output(out)                                    (reshape/permute)

Every emitted node goes through graph_edit.emit (shape metadata, provenance of rewrite_attention,
attributed to the anchor's module).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from ..graph_edit import emit
from ..layout_trace import Groups, TraceError, Traced, shape_of
from .match import PASS_NAME
from .score_mask import EmptyRows, ScoreMask

aten = torch.ops.aten


@dataclass(frozen=True, eq=False)
class Canonical:
    """One of q, k, v to rebuild from its source with axes = groups (B, H, N, D). Broadcast atoms
    are materialised with expand, except those whose ids are in `drop` (the kv-head repeat of
    MQA/GQA, which vsopt.attention does itself)."""

    traced: Traced
    groups: Groups
    drop: frozenset[int] = frozenset()


@dataclass(frozen=True, eq=False)
class SoftmaxEmit:
    """What SoftmaxAttentionRule.rewrite emits for one match: q/k/v rebuilt canonically, the
    mask, the total scale, and how to lay the (B, H, Nq, Dv) result out as the value matmul's
    output (out_groups: the canonical atoms; out_axes: the atoms of each output axis)."""

    q: Canonical
    k: Canonical
    v: Canonical
    mask: ScoreMask | None
    empty_rows: EmptyRows | None  # what the original gives for a row the mask empties (None: no mask)
    scale: float
    out_groups: Groups
    out_axes: Groups
    softcap: float = 0.0  # > 0: the scores are capped, softcap * tanh(scale * q k^T / softcap) (rules/softcap.py)


def groups_of(axes) -> Groups:
    return tuple(tuple(g) for g in axes)


def emit_canonical(graph: torch.fx.Graph, c: Canonical, anchor: torch.fx.Node) -> torch.fx.Node:
    """Build c.traced's values from its source, with axes = c.groups (each group's atoms merged
    row-major), broadcast atoms expanded except those in c.drop."""
    em = lambda target, *args: emit(graph, target, args, pass_name=PASS_NAME, meta_from=anchor)  # noqa: E731
    traced, groups, drop = c.traced, c.groups, c.drop
    x = traced.source
    src_shape = shape_of(x)
    leaves = [a for axis in traced.source_atoms for a in axis]
    leaf_shape = [a.size for a in leaves]
    if list(src_shape) != leaf_shape:
        x = em(aten.reshape.default, x, leaf_shape)
    pos = {a.id: i for i, a in enumerate(leaves)}
    order = [pos[a.id] for g in groups for a in g if not a.is_broadcast]
    if sorted(order) != list(range(len(leaves))):
        raise TraceError("an axis of the source does not reach the attention")
    if order != sorted(order):
        x = em(aten.permute.default, x, order)
    kept = [a for g in groups for a in g if a.id not in drop]
    if any(a.is_broadcast for a in kept):
        x = em(aten.reshape.default, x, [1 if a.is_broadcast else a.size for a in kept])
        x = em(aten.expand.default, x, [a.size for a in kept])
    final = [math.prod(a.size for a in g if a.id not in drop) for g in groups]
    if [a.size for a in kept] != final:
        x = em(aten.reshape.default, x, final)
    return x


def emit_output(graph: torch.fx.Graph, out: torch.fx.Node, groups: Groups, out_axes: Groups,
                pv: torch.fx.Node, anchor: torch.fx.Node) -> torch.fx.Node:
    """Lay the canonical (B, H, Nq, Dv) result out as the value matmul's output `pv` was."""
    em = lambda target, *args: emit(graph, target, args, pass_name=PASS_NAME, meta_from=anchor)  # noqa: E731
    atoms = [a for g in groups for a in g]
    sizes = [a.size for a in atoms]
    x = out
    if sizes != list(shape_of(out)):
        x = em(aten.reshape.default, x, sizes)
    # value-feature atoms of the output are v's feature atoms; rows are q's token atoms
    pos = {a.id: i for i, a in enumerate(atoms)}
    flat = [a for ax in out_axes for a in ax]
    if any(a.id not in pos for a in flat) or len(flat) != len(atoms):
        raise TraceError("the value matmul's output axes do not match the attention's")
    order = [pos[a.id] for a in flat]
    if order != sorted(order):
        x = em(aten.permute.default, x, order)
    target_shape = list(shape_of(pv))
    if [a.size for a in flat] != target_shape:
        x = em(aten.reshape.default, x, target_shape)
    return x
