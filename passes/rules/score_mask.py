"""The one mask a softmax attention applies to its scores, what it means, and how to emit it exactly
(a helper of SoftmaxAttentionRule).

A model masks its scores in one of two ways:

    add:  scores + m                (an additive mask; baddbmm's bias is one too)
    fill: scores.masked_fill(c, x) / torch.where(c, scores, x) / torch.where(c, x, scores)

vsopt.attention takes an additive mask or a boolean keep mask. A fill *sets* the scores to x
(a select), which neither can express for a finite x: masked_fill(~keep, 0.0) is not
scores + 0.0 * dropped. So a fill is rewritten only where the select equals a keep mask:
x = -inf, or x <= EXCLUDED_FILL, whose exp(x - row max) is exactly 0 in float32 and float64 as
long as a kept score of the row is above x + 104 (-9896 for x = -1e4). Any other fill leaves the
site alone, with the reason. The value x is the one that reaches the softmax: a scale applied
after the fill scales it too.

A fully masked row is not attention any more, and the original graph decides what it gives:
    -inf fill or additive -inf  -> NaN from aten._softmax / softmax (0 from aten._safe_softmax)
    finite fill <= EXCLUDED_FILL -> every score equal: the mean of v over the keys
SDPA kernels return 0 for such rows, so the rewrite emits an exact fix-up (`EmptyRows`):
out = where(row has a key, out, value). Rows the mask cannot empty need none (no mask).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.fx

from ..graph_edit import emit
from ..layout_trace import Groups, TraceError, shape_of
from .match import PASS_NAME

aten = torch.ops.aten

EXCLUDED_FILL = -1e4  # a fill value at or below this (at the softmax) drops the key, as -inf does
FILL_OPS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.ScalarOther, aten.where.ScalarSelf,
            aten.where.self}


def scalar_constant(x) -> float | None:
    """x as a Python float when it is a number, or a graph node making a 0-d constant of one
    (torch.where(c, s, -inf) puts aten.scalar_tensor(-inf) into the graph)."""
    if isinstance(x, numbers.Number) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, torch.fx.Node) and x.op == "call_function":
        if x.target is aten.scalar_tensor.default and isinstance(x.args[0], numbers.Number):
            return float(x.args[0])
        if x.target is aten.full.default and list(x.args[0]) == [] and isinstance(x.args[1], numbers.Number):
            return float(x.args[1])
    return None


@dataclass(frozen=True)
class Fill:
    """A fill of the scores: they become `value` where `cond` is `where`."""

    scores: torch.fx.Node  # the scores before the fill (the node on the score path)
    cond: torch.fx.Node
    value: float
    where: bool  # True: filled where cond is True (masked_fill); False: where cond is False


def fill_of(n: torch.fx.Node) -> Fill | None:
    """The fill `n` applies, if n is one with a constant value and a boolean condition."""
    if n.op != "call_function" or n.target not in FILL_OPS:
        return None
    if n.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        scores, cond, value, where = n.args[0], n.args[1], scalar_constant(n.args[2]), True
    elif n.target is aten.where.ScalarOther:
        cond, scores, value, where = n.args[0], n.args[1], scalar_constant(n.args[2]), False
    elif n.target is aten.where.ScalarSelf:
        cond, value, scores, where = n.args[0], scalar_constant(n.args[1]), n.args[2], True
    else:  # where.self: the constant is on either side
        cond, a, b = n.args[:3]
        if scalar_constant(b) is not None:
            scores, value, where = a, scalar_constant(b), False
        else:
            scores, value, where = b, scalar_constant(a), True
    if value is None or not isinstance(scores, torch.fx.Node) or not isinstance(cond, torch.fx.Node):
        return None
    cval = cond.meta.get("val")
    if not isinstance(cval, torch.Tensor) or cval.dtype != torch.bool:
        return None
    return Fill(scores, cond, value, where)


@dataclass(frozen=True, eq=False)
class ScoreMask:
    """The one mask the model applies to the scores.

    kind "add": `tensor` is added to the scores (times `factor`, baddbmm's beta); kind "keep":
    the scores keep their value where `tensor` is True (or False, when `invert`) and the key is
    dropped elsewhere. axes: the atoms of the scores where the mask is applied; groups: the
    canonical (B, H, Nq, Nk) atoms; scale_before: the scale applied to the scores before it."""

    kind: str
    tensor: torch.fx.Node
    invert: bool
    axes: Groups
    groups: Groups
    scale_before: float
    factor: float


@dataclass(frozen=True)
class EmptyRows:
    """What the original graph gives for a row whose keys are all masked: `value` (NaN or 0.0),
    or the mean of v over the keys (mean_of_v)."""

    value: float = math.nan
    mean_of_v: bool = False


def fill_mask(fill: Fill, after: float, softmax_empty: float) -> tuple[bool, EmptyRows] | str:
    """A fill whose value is multiplied by `after` on its way to the softmax, as a keep mask:
    (invert, what an emptied row gives), or the reason it cannot be one. softmax_empty: what the
    anchor gives for a row of -inf (NaN, or 0 for aten._safe_softmax)."""
    value = fill.value * after
    if value == -math.inf:
        return fill.where, EmptyRows(value=softmax_empty)
    if value <= EXCLUDED_FILL:  # finite (NaN compares False, +inf is above): all-equal rows are uniform
        return fill.where, EmptyRows(mean_of_v=True)
    return (f"the scores are filled with the finite value {value:g}: a select, not a mask (vsopt.attention "
            f"takes additive or boolean masks, and only fills of {EXCLUDED_FILL:g} or less drop the key "
            "exactly)")


def emit_mask(graph: torch.fx.Graph, mask: ScoreMask, scale_total: float, dtype: torch.dtype,
              anchor: torch.fx.Node, query_dtype: torch.dtype | None = None) -> torch.fx.Node:
    """The mask as a tensor broadcastable to (B, H, Nq, Nk): boolean (True = keep) for a keep
    mask, else additive in `dtype` (the scores' dtype: a boolean or integer tensor added to the
    scores is a number, not a keep mask), multiplied by any scale applied after it. An additive
    mask SDPA would refuse next to a query of `query_dtype` (SDPA takes float32 or the query's
    dtype) is made float32: a bfloat16 mask added to float32 scores (CUDA's math SDPA on 16-bit
    inputs, traced to ATen) was promoted by the model, exactly so."""
    em = lambda target, *args: emit(graph, target, args, pass_name=PASS_NAME, meta_from=anchor)  # noqa: E731
    axes, groups = mask.axes, mask.groups
    m = mask.tensor
    if mask.kind == "keep":
        if mask.invert:
            m = em(aten.logical_not.default, m)
    else:
        have = m.meta["val"].dtype
        want = have if m.meta["val"].is_floating_point() else dtype
        if query_dtype is not None and want not in (torch.float32, query_dtype):
            want = torch.float32
        if want != have:
            m = emit(graph, aten._to_copy.default, (m,), {"dtype": want}, pass_name=PASS_NAME, meta_from=anchor)
        # the model scaled the mask by `factor` and by every scale applied after it was added
        after = mask.factor * (scale_total / mask.scale_before if mask.scale_before else 1.0)
        if after != 1.0:
            m = em(aten.mul.Tensor, m, after)
    # lay the mask's axes over the score axes (right-aligned broadcasting), atom by atom
    mshape = list(shape_of(m))
    mshape = [1] * (len(axes) - len(mshape)) + mshape
    leaf_sizes, leaf_atoms = [], []
    for ax, s in zip(axes, mshape):
        for a in ax:
            leaf_sizes.append(a.size if s != 1 else 1)
            leaf_atoms.append(a)
        if s != 1 and s != math.prod(a.size for a in ax):
            raise TraceError("mask does not broadcast over the scores")
    if leaf_sizes != list(shape_of(m)):
        m = em(aten.reshape.default, m, leaf_sizes)
    pos = {a.id: i for i, a in enumerate(leaf_atoms)}
    order = [pos[a.id] for g in groups for a in g]
    if order != sorted(order):
        m = em(aten.permute.default, m, order)
    sizes = [leaf_sizes[i] for i in order]
    full, merged, i = list(sizes), [], 0
    for g in groups:
        part = sizes[i:i + len(g)]
        if any(s == 1 for s in part) and any(s != 1 for s in part):  # partly broadcast: materialise
            full[i:i + len(g)] = [a.size for a in g]
        merged.append(math.prod(full[i:i + len(g)]))
        i += len(g)
    if full != sizes:
        m = em(aten.expand.default, m, full)
    if full != merged:
        m = em(aten.reshape.default, m, merged)
    return m


def emit_empty_rows(graph: torch.fx.Graph, out: torch.fx.Node, m4: torch.fx.Node, v4: torch.fx.Node,
                    empty: EmptyRows, anchor: torch.fx.Node) -> torch.fx.Node:
    """out (B, H, Nq, Dv) with the rows whose keys the mask m4 all drops set to what the original
    graph gives for them. m4: the emitted mask (keep mask or additive, broadcastable to
    (B, H, Nq, Nk)); v4: the canonical (B, Hkv, Nk, Dv) values."""
    em = lambda target, *args: emit(graph, target, args, pass_name=PASS_NAME, meta_from=anchor)  # noqa: E731
    kept = m4 if m4.meta["val"].dtype == torch.bool else em(aten.ne.Scalar, m4, -math.inf)
    has_key = em(aten.any.dim, kept, -1, True)  # (b, h, q, 1), broadcast like the mask
    if not empty.mean_of_v:
        return em(aten.where.ScalarOther, has_key, out, empty.value)
    mean = em(aten.mean.dim, v4, [2], True)  # (B, Hkv, 1, Dv)
    heads, kv_heads = shape_of(out)[1], shape_of(v4)[1]
    if heads != kv_heads:
        mean = em(aten.repeat_interleave.self_int, mean, heads // kv_heads, 1)
    if mean.meta["val"].dtype != out.meta["val"].dtype:
        mean = emit(graph, aten._to_copy.default, (mean,), {"dtype": out.meta["val"].dtype}, pass_name=PASS_NAME,
                    meta_from=anchor)
    return em(aten.where.self, has_key, out, mean)
