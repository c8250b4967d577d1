"""SoftmaxAttentionRule: softmax(scale * q @ k^T + mask) @ v written out with matmuls.

scores = q @ k^T (matmul, bmm, baddbmm or einsum; any layout, heads merged or not, k/v heads
broadcast for MQA/GQA) -> scalar scale (mul/div, before the matmul on q or k, or after it) ->
optional mask (additive, baddbmm's bias, or a masked_fill / where fill that drops keys: exactly
what rules/score_mask.py accepts, fully masked rows included) -> dtype casts, and optionally a
logit soft cap cap * tanh(scores / cap) before the mask (rules/softcap.py) ->
softmax over the key axis -> dropout that is a no-op -> probs @ v. Anchored on the softmax;
layouts are followed with passes.layout_trace atoms (rules/operands.py), and the rewrite rebuilds
q, k, v canonically (rules/canonical.py).

Before (timm's non-fused path, ATen after make_fx), one site:
    bmm -> _unsafe_view -> mul(0.125) -> _softmax(-1) -> expand -> view -> bmm -> _unsafe_view
After:
    vsopt.attention(q4, k4, v4, None, 0.125, False) -> reshape -> _unsafe_view
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx

from vsopt.core import ops as vsopt_ops  # noqa: F401  (registers torch.ops.vsopt.*)
from vsopt.core.ir import Layout

from ..graph_edit import emit
from ..layout_trace import ORDER_OPS, TraceError, apply, scalar_factor
from .attention_shape import not_attention
from .canonical import Canonical, SoftmaxEmit, emit_canonical, emit_output, groups_of
from .match import PASS_NAME, AttentionMatch, AttentionRule, MatchResult, normalize_args, users
from .operands import Operand, einsum_spec, group_sizes, operands
from .score_mask import EmptyRows, ScoreMask, emit_empty_rows, emit_mask, fill_mask, fill_of
from .softcap import is_tanh, softcap_of

aten = torch.ops.aten

SOFTMAX_OPS = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
SCORE_OPS = {aten.bmm.default, aten.baddbmm.default, aten.matmul.default, aten.einsum.default}
CAST_OPS = {aten._to_copy.default, aten.to.dtype}
DROPOUT_OPS = {aten.dropout.default, aten.native_dropout.default}


def _is_cast(n: torch.fx.Node) -> bool:
    if n.op != "call_function" or n.target not in CAST_OPS:
        return False
    return set(n.kwargs) <= {"dtype", "memory_format", "layout", "device"} and (
        "device" not in n.kwargs or n.kwargs["device"] == n.args[0].meta["val"].device)


def _is_noop_dropout(n: torch.fx.Node) -> bool:
    if n.op != "call_function" or n.target not in DROPOUT_OPS:
        return False
    a = normalize_args(n)
    return a["p"] == 0 or a["train"] is False


def _is_dropout_active(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and n.target in DROPOUT_OPS and not _is_noop_dropout(n)


def score_path(x: torch.fx.Node) -> list[torch.fx.Node] | None:
    """Nodes from the score matmul (first) to x (last), through scale / mask / cast / layout ops;
    None if x does not come from a matmul that way."""
    path = []
    while isinstance(x, torch.fx.Node) and x.op == "call_function":
        path.append(x)
        if x.target in SCORE_OPS:
            return list(reversed(path))
        fill = fill_of(x)
        if x.target in ORDER_OPS or scalar_factor(x) is not None or _is_cast(x) or is_tanh(x):
            x = x.args[0]
        elif fill is not None:
            x = fill.scores
        elif x.target is aten.add.Tensor and len(x.args) == 2 and not x.kwargs:
            for i in (0, 1):
                sub = score_path(x.args[i])
                if sub is not None:
                    return sub + list(reversed(path))
            return None
        else:
            return None
    return None


def _blocking_op(x: torch.fx.Node, depth: int = 6) -> torch.fx.Node | None:
    """If a matmul reaches the softmax input within `depth` ops along first floating-point
    arguments (a where's condition is not the scores), the op nearest the matmul that the score
    path does not accept (so the skip can name it)."""
    chain = []
    while isinstance(x, torch.fx.Node) and x.op == "call_function" and len(chain) < depth:
        if x.target in SCORE_OPS:
            for n in reversed(chain):  # nearest the matmul first
                if score_path(n) is None:
                    return n
            return chain[0] if chain else None
        chain.append(x)
        args = [a for a in x.args if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
                and a.meta["val"].is_floating_point()]
        if not args:
            return None
        x = args[0]
    return None


def _layout_of(o: Operand) -> Layout:
    """BNHD when, in q's source, the token axis comes before the head axis."""
    src_axis = {a.id: a.source_axis for ax in o.traced.source_atoms for a in ax}
    tok = [src_axis[a.id] for a in o.token if a.id in src_axis]
    heads = [src_axis[a.id] for a in o.batch[1:] if a.id in src_axis]
    if tok and heads and min(tok) < min(heads):
        return Layout.BNHD
    return Layout.BHND


def _token_axes(o: Operand) -> tuple[torch.fx.Node, tuple[int, ...]]:
    axes = sorted({a.source_axis for a in o.token if a.source_axis is not None})
    return (o.traced.source, tuple(axes))


class SoftmaxAttentionRule(AttentionRule[SoftmaxEmit]):
    """softmax(scale * q @ k^T + mask) @ v, written with matmul / bmm / baddbmm / einsum.

    One rule name whatever the matmul spelling: torch.compile's graphs lower matmul and einsum to
    bmm while torch.export's keep them, and a site must read the same in both."""

    name = "softmax"

    def __repr__(self) -> str:
        return "SoftmaxAttentionRule()"

    def pattern(self, node: torch.fx.Node) -> bool:
        return node.op == "call_function" and node.target in SOFTMAX_OPS

    def check(self, sm: torch.fx.Node) -> MatchResult:
        fail = lambda reason: MatchResult.fail(sm, self.name, reason)  # noqa: E731
        why_not = not_attention(sm)
        if why_not is not None:  # not an attention at all: no candidate (rules/attention_shape.py)
            return MatchResult.fail(sm, self.name, why_not, candidate=False)
        path = score_path(sm.args[0])
        if path is None:
            blocker = _blocking_op(sm.args[0])
            if blocker is None:
                return fail("the scores reach the softmax through ops that are not a scalar scale, a mask, "
                            "a cast or a reshape")
            return fail(f"{blocker.name} ({blocker.target}) between the scores and the softmax is not a scalar "
                        "scale, a mask, a cast or a reshape")
        score = path[0]
        got = operands(score)
        if isinstance(got, str):
            return fail(got)
        oq, ok_, spec_out, _kind, extra = got
        axes = [(oq.axes if side == "a" else ok_.axes)[i] for side, i in spec_out]
        for n in path:
            if len(users(n)) != 1:
                return fail(f"the attention scores ({n.name}) are also used outside the attention")
        if any(a.is_broadcast for a in oq.batch):
            return fail("q is broadcast over a batch axis")
        # ---- scores: scale and mask between the matmul and the softmax
        scale = oq.traced.scale * ok_.traced.scale
        masks = []  # (kind, tensor or Fill, axes at that point, scale applied before it, factor on the mask)
        before_tanh = None  # with a soft cap: the scale applied before the tanh (`scale` then restarts at 1)
        if extra is not None:  # baddbmm: beta * bias + alpha * (q @ k^T)
            bias, beta, alpha = extra
            scale *= alpha
            if beta != 0:
                masks.append(("add", bias, axes, scale, beta))
        try:
            for n in path[1:]:
                f = scalar_factor(n)
                fill = fill_of(n)
                if f is not None:
                    scale *= f
                elif is_tanh(n):
                    if masks or before_tanh is not None:
                        return fail(f"{n.name}: a tanh after a mask or another tanh is not a soft cap")
                    before_tanh, scale = scale, 1.0
                elif n.target in ORDER_OPS:
                    axes = apply(n, axes, {})
                elif fill is not None:
                    masks.append(("keep", fill, axes, scale, 1.0))
                elif n.target is aten.add.Tensor:
                    prev = path[path.index(n) - 1]
                    other = n.args[1] if n.args[0] is prev else n.args[0]
                    if not isinstance(other, torch.fx.Node):
                        return fail(f"{n.name} adds a constant to the scores")
                    masks.append(("add", other, axes, scale, 1.0))
        except TraceError as e:
            return fail(f"cannot follow the scores: {e}")
        if len(masks) > 1:
            return fail("more than one mask is applied to the scores")
        softcap, mask_scale = 0.0, scale  # mask_scale: the factor applied to the scores the mask is added to
        if before_tanh is not None:
            cap = softcap_of(before_tanh, scale)
            if isinstance(cap, str):
                return fail(cap)
            softcap, scale = cap.cap, cap.scale
        ndim = len(axes)
        dim = sm.args[1] % ndim
        if axes[dim] != ok_.token:
            return fail(f"softmax is over axis {sm.args[1]}, not the key axis of {score.name}")
        expect = set(a.id for a in oq.batch + oq.token + ok_.token)
        if {a.id for ax in axes for a in ax} != expect:
            return fail("the scores are rearranged in a way that mixes their axes")
        # ---- probabilities: softmax -> (cast, no-op dropout, layout) -> second matmul
        x, p_axes, probs_path = sm, axes, [sm]
        while True:
            if len(users(x)) != 1:
                return fail(f"the attention probabilities ({x.name}) are also used outside the attention")
            (u,) = users(x)
            if u.op != "call_function":
                return fail("softmax output is not multiplied with v")
            if u.target is aten.native_dropout.default and _is_noop_dropout(u):
                outs = [g for g in users(u) if g.target is operator.getitem and g.args[1] == 0]
                if len(users(u)) != 1 or len(outs) != 1:
                    return fail("the dropout mask is used")
                probs_path += [u]
                x = outs[0]
                probs_path.append(x)
                continue
            if _is_cast(u) or _is_noop_dropout(u):
                probs_path.append(u)
                x = u
                continue
            if u.target in ORDER_OPS:
                try:
                    p_axes = apply(u, p_axes, {})
                except TraceError as e:
                    return fail(f"cannot follow the probabilities: {e}")
                probs_path.append(u)
                x = u
                continue
            if u.target in SCORE_OPS and u.target is not aten.baddbmm.default:
                pv = u
                break
            if _is_dropout_active(u):
                return fail(f"attention dropout is active ({u.name}); only p=0 or eval mode is exact")
            return fail(f"softmax output goes to {u.target} ({u.name}), not to a matmul with v")
        # the probabilities must be the first operand, laid out as (batch..., q, k)
        first = pv.args[1][0] if pv.target is aten.einsum.default else pv.args[0]
        if first is not x:
            return fail("the probabilities are not the first operand of the value matmul")
        got = operands(pv)
        if isinstance(got, str):
            return fail(got)
        op_p, ov, pv_spec, _, _ = got
        ov = Operand(ov.traced, ov.axes, ov.batch, token=ov.feature, feature=ov.token)  # v: rows = keys
        if len(op_p.axes) != len(p_axes):
            return fail("the probabilities are broadcast in the value matmul")
        # which axes of the probabilities the value matmul reads as rows and as the contraction
        if pv.target is aten.einsum.default:
            (ea, eb), _eo = einsum_spec(pv.args[0])
            rows = next(i for i, ch in enumerate(ea) if ch not in eb)
            contract = next(i for i, ch in enumerate(ea) if ch in eb and ch not in _eo)
        else:
            rows, contract = len(p_axes) - 2, len(p_axes) - 1
        p_batch_axes = [i for i in range(len(p_axes)) if i not in (rows, contract)]
        if [a.id for i in p_batch_axes for a in p_axes[i]] != [a.id for a in oq.batch] or \
                p_axes[rows] != oq.token or p_axes[contract] != ok_.token:
            return fail("the value matmul does not contract the probabilities over the key axis")
        out_axes = [p_axes[i] if side == "a" else ov.axes[i] for side, i in pv_spec]
        if ov.traced.scale != 1.0:
            return fail("v is scaled before the value matmul")
        # ---- canonical groups: B = q batch atoms from q's source axis 0, H = the rest
        nb = 0
        while nb < len(oq.batch) and oq.batch[nb].source_axis == 0:
            nb += 1
        bq, hq = oq.batch[:nb], oq.batch[nb:]
        B, H = math.prod(a.size for a in bq), math.prod(a.size for a in hq)
        kv = {}
        for label, o in (("k", ok_), ("v", ov)):
            groups = group_sizes(o.batch, [B, H])
            if groups is None:
                return fail(f"{label}'s batch/head axes do not line up with q's")
            bg, hg = groups
            # trailing broadcast atoms of the head group: each kv head serves a run of q heads (GQA)
            drop = []
            for a in reversed(hg):
                if not a.is_broadcast:
                    break
                drop.append(a.id)
            kv[label] = (o, bg, hg, set(drop))
        hk = math.prod(a.size for a in kv["k"][2] if a.id not in kv["k"][3])
        hv = math.prod(a.size for a in kv["v"][2] if a.id not in kv["v"][3])
        if hk != hv:
            kv["k"] = (kv["k"][0], kv["k"][1], kv["k"][2], set())
            kv["v"] = (kv["v"][0], kv["v"][1], kv["v"][2], set())
            hk = hv = H
        Nq, Nk = math.prod(a.size for a in oq.token), math.prod(a.size for a in ok_.token)
        D, Dv = math.prod(a.size for a in oq.feature), math.prod(a.size for a in ov.feature)
        if math.prod(a.size for a in ov.token) != Nk:
            return fail("k and v have different lengths")
        mask = empty_rows = None
        if masks:
            kind, what, m_axes, scale_before, factor = masks[0]
            # a row the mask empties: what the anchor gives for all -inf scores
            softmax_empty = 0.0 if sm.target is aten._safe_softmax.default else math.nan
            invert, empty_rows = False, EmptyRows(value=softmax_empty)
            if kind == "keep":
                got = fill_mask(what, mask_scale / scale_before if scale_before else 1.0, softmax_empty)
                if isinstance(got, str):
                    return fail(got)
                (invert, empty_rows), what = got, what.cond
            mask = ScoreMask(kind, what, invert, groups_of(m_axes), groups_of([bq, hq, oq.token, ok_.token]),
                             scale_before, factor)
        canonical = {label: Canonical(o.traced, groups_of([bg, hg, o.token, o.feature]), frozenset(drop))
                     for label, (o, bg, hg, drop) in kv.items()}
        record = SoftmaxEmit(q=Canonical(oq.traced, groups_of([bq, hq, oq.token, oq.feature])), k=canonical["k"],
                           v=canonical["v"], mask=mask, empty_rows=empty_rows, scale=scale,
                           out_groups=groups_of([bq, hq, oq.token, ov.feature]), out_axes=groups_of(out_axes),
                           softcap=softcap)
        return self.matched(
            sm, record, anchor=sm, output=pv, layout=Layout.BN_D if len(axes) == 3 else _layout_of(oq), batch=B,
            heads=H, kv_heads=hk, head_dim=D, value_dim=Dv, q_len=Nq, kv_len=Nk,
            dtype=oq.traced.source.meta["val"].dtype, scale=scale, has_mask=mask is not None, is_causal=False,
            nodes=tuple(n.name for n in path + probs_path + [pv]), q_token_source=_token_axes(oq), softcap=softcap)

    def rewrite(self, graph: torch.fx.Graph, match: AttentionMatch[SoftmaxEmit]) -> torch.fx.Node:
        e, sm = match.emit, match.anchor
        q4 = emit_canonical(graph, e.q, sm)
        k4 = emit_canonical(graph, e.k, sm)
        v4 = emit_canonical(graph, e.v, sm)
        # a capped site's mask is added to the capped scores: the factors after it are the cap's
        mask_scale = e.softcap if e.softcap else e.scale
        m4 = (emit_mask(graph, e.mask, mask_scale, sm.args[0].meta["val"].dtype, sm, q4.meta["val"].dtype)
              if e.mask is not None else None)
        cap = (e.softcap,) if e.softcap else ()   # uncapped sites keep the six-argument call
        out = emit(graph, torch.ops.vsopt.attention.default, (q4, k4, v4, m4, e.scale, False, *cap),
                   pass_name=PASS_NAME, replaces=match.nodes, meta_from=sm)
        if e.empty_rows is not None:  # the rows the mask empties, as the original graph gives them
            out = emit_empty_rows(graph, out, m4, v4, e.empty_rows, sm)
        return emit_output(graph, out, e.out_groups, e.out_axes, match.output, sm)
