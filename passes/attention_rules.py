"""The rewrite rules that recognise attention in an ATen graph: one class per rule, each with
pattern (which nodes it anchors on), check (a MatchResult: a Match, or the reason it does not
apply) and rewrite (replace the match with torch.ops.vsopt.attention in (B, H, N, D) layout).

Rules read only node.meta["val"] (shapes, dtypes); they never run the model.

- SdpaRule(op): F.scaled_dot_product_attention in each ATen spelling (the op itself in export's
  graphs; the flash / efficient / cuDNN / CPU-flash ops it lowers to under torch.compile). One
  instance per op, its argument names read from the op's schema.
- SoftmaxAttentionRule(): scores = q @ k^T (matmul, bmm, baddbmm or einsum; any layout, heads
  merged or not, k/v heads broadcast for MQA/GQA) -> scalar scale (mul/div, before the matmul on
  q or k, or after it) -> optional mask (additive add, boolean masked_fill / where, baddbmm's
  bias) -> dtype casts -> softmax over the key axis -> dropout that is a no-op -> probs @ v.
  Anchored on the softmax; layouts are followed with passes.layout_trace atoms.

Before (timm's non-fused path, ATen after make_fx), one site:
    bmm -> _unsafe_view -> mul(0.125) -> _softmax(-1) -> expand -> view -> bmm -> _unsafe_view
After:
    vsopt.attention(q4, k4, v4, None, 0.125, False) -> reshape -> _unsafe_view
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from vsopt.core import ops as vsopt_ops  # noqa: F401  (registers torch.ops.vsopt.*)
from vsopt.core.ir import Layout

from .graph_edit import emit
from .layout_trace import ORDER_OPS, Atom, TraceError, Traced, apply, scalar_factor, shape_of, trace_back

aten = torch.ops.aten
PASS_NAME = "rewrite_attention"


@dataclass
class Match:
    """Everything a rule learned about one attention; enough to build the AttentionSite and to
    rewrite. Nodes are graph nodes; shapes are in the canonical (B, H, N, D) sense."""

    rule: str
    anchor: torch.fx.Node  # the node the site is attributed to (softmax, or the SDPA op)
    output: torch.fx.Node  # the node whose value the rewrite replaces
    layout: Layout
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    q_len: int
    kv_len: int
    dtype: torch.dtype
    scale: float
    has_mask: bool
    is_causal: bool
    nodes: tuple[str, ...]  # names of the matched nodes
    q_token_source: tuple[torch.fx.Node, list[int]] | None = None  # (node, its axes forming q's tokens)
    build: Any = field(default=None, repr=False)  # callable(graph) -> replacement node


@dataclass
class MatchResult:
    """Outcome of a rule's check on one node: `match` on success, else `reason` (a value, not an
    exception, so the graph-diff debugger can print it)."""

    node: torch.fx.Node
    rule: str
    match: Match | None = None
    reason: str = ""
    candidate: bool = True  # False: the node was never an attention (not worth reporting)

    @property
    def ok(self) -> bool:
        return self.match is not None

    @classmethod
    def fail(cls, node: torch.fx.Node, rule: str, reason: str) -> "MatchResult":
        return cls(node=node, rule=rule, reason=reason)


def _normalize(node: torch.fx.Node) -> dict[str, Any]:
    """node's arguments by schema name (defaults filled in)."""
    schema = node.target._schema
    out, pos = {}, list(node.args)
    for i, arg in enumerate(schema.arguments):
        if i < len(pos) and not arg.kwarg_only:
            out[arg.name] = pos[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """node's users, without torch.export's aten._assert_tensor_metadata checks (they read a
    value's metadata but do not consume it; the rewrite erases them with the node)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _dtype(node: torch.fx.Node) -> torch.dtype:
    return node.meta["val"].dtype


def _bnhd_or_bhnd(q: torch.fx.Node) -> Layout:
    """BNHD when the model transposed a (B, N, H, D) tensor into SDPA's (B, H, N, D)."""
    if q.op == "call_function":
        if q.target is aten.transpose.int and sorted(d % 4 for d in q.args[1:3]) == [1, 2]:
            return Layout.BNHD
        if q.target is aten.permute.default and list(q.args[1]) == [0, 2, 1, 3]:
            return Layout.BNHD
    return Layout.BHND


# ----------------------------------------------------------------------------- SDPA


SDPA_OPS = {
    # op name -> (mask argument name or None, does it return a tuple)
    "scaled_dot_product_attention": ("attn_mask", False),
    "_scaled_dot_product_flash_attention_for_cpu": ("attn_mask", True),
    "_scaled_dot_product_flash_attention": (None, True),
    "_scaled_dot_product_efficient_attention": ("attn_bias", True),
    "_scaled_dot_product_cudnn_attention": ("attn_bias", True),
}


class SdpaRule:
    """torch SDPA in one of its ATen spellings (`op_name`, a key of SDPA_OPS)."""

    def __init__(self, op_name: str):
        self.op = getattr(aten, op_name).default
        self.mask_arg, self.returns_tuple = SDPA_OPS[op_name]
        self.name = "sdpa"

    def pattern(self, node: torch.fx.Node) -> bool:
        return node.op == "call_function" and node.target is self.op

    def check(self, node: torch.fx.Node) -> MatchResult:
        fail = lambda reason: MatchResult.fail(node, self.name, reason)  # noqa: E731
        a = _normalize(node)
        q, k, v = a["query"], a["key"], a["value"]
        if a.get("dropout_p") not in (0, 0.0, None):
            return fail(f"attention dropout p={a['dropout_p']} is active (training); only p=0 is exact")
        output = node
        if self.returns_tuple:
            outs = [u for u in users(node) if u.target is operator.getitem and u.args[1] == 0]
            if len(outs) != 1 or len(users(node)) != 1:
                return fail("the SDPA op's auxiliary outputs (logsumexp, rng state) are used")
            output = outs[0]
        try:
            qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
        except TraceError as e:
            return fail(str(e))
        if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
            return fail(f"q/k/v must be 4-D (B, H, N, D); got {qs}, {ks}, {vs}")
        if qs[1] % ks[1] or ks[1] != vs[1]:
            return fail(f"query heads {qs[1]} are not a multiple of key/value heads {ks[1]}/{vs[1]}")
        if qs[0] != ks[0] or ks[0] != vs[0]:
            return fail(f"batch sizes differ: q {qs[0]}, k {ks[0]}, v {vs[0]}")
        mask = a.get(self.mask_arg) if self.mask_arg else None
        scale = a.get("scale")
        scale = 1.0 / math.sqrt(qs[-1]) if scale is None else float(scale)
        is_causal = bool(a.get("is_causal"))

        def build(graph: torch.fx.Graph) -> torch.fx.Node:
            return emit(graph, torch.ops.vsopt.attention.default, (q, k, v, mask, scale, is_causal),
                        pass_name=PASS_NAME, replaces=(node.name,), meta_from=node)

        m = Match(rule=self.name, anchor=node, output=output, layout=_bnhd_or_bhnd(q), batch=qs[0], heads=qs[1],
                  kv_heads=ks[1], head_dim=qs[-1], value_dim=vs[-1], q_len=qs[2], kv_len=ks[2], dtype=_dtype(q),
                  scale=scale, has_mask=mask is not None, is_causal=is_causal,
                  nodes=tuple(n.name for n in {node, output}), q_token_source=(q, [2]), build=build)
        return MatchResult(node=node, rule=self.name, match=m)


# ----------------------------------------------------------------------------- softmax chains


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
    a = _normalize(n)
    return a["p"] == 0 or a["train"] is False


@dataclass
class _Operand:
    """A matmul operand seen as atoms: batch atoms (flattened over the batch axes), the row/token
    atoms and the contraction atoms."""

    traced: Traced
    axes: list[list[Atom]]  # the operand's axes as the matmul sees them (broadcast batch axes padded)
    batch: list[Atom]
    token: list[Atom]
    feature: list[Atom]


def _einsum_spec(eq: str) -> tuple[list[str], str] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    ins = ins.split(",")
    return (ins, out) if len(ins) == 2 else None


OutSpec = list[tuple[str, int]]  # per output axis: ("a" or "b", the operand axis it comes from)


def _operands(score: torch.fx.Node) -> tuple[_Operand, _Operand, OutSpec, str, Any] | str:
    """For a matmul-like node A x B: (A as _Operand with token = rows, B with token = columns,
    where each output axis comes from, the kind of matmul, extra: baddbmm's (bias, beta, alpha)).
    A string is a failure reason."""
    t = score.target
    a_node, b_node = (score.args[1], score.args[2]) if t is aten.baddbmm.default else (score.args[0], score.args[1])
    if t is aten.einsum.default:
        spec = _einsum_spec(score.args[0])
        if spec is None or len(score.args[1]) != 2:
            return f"einsum {score.args[0]!r} is not a two-operand explicit contraction"
        (ea, eb), eo = spec
        a_node, b_node = score.args[1]
    try:
        ta = trace_back(a_node, follow_scale=True)
        tb = trace_back(b_node, follow_scale=True)
    except TraceError as e:
        return f"cannot follow a matmul operand: {e}"
    if t is aten.einsum.default:
        contract = set(ea) & set(eb) - set(eo)
        rows, cols = [c for c in ea if c not in eb], [c for c in eb if c not in ea]
        batch = [c for c in eo if c in ea and c in eb]
        if len(contract) != 1 or len(rows) != 1 or len(cols) != 1 or len(eo) != len(batch) + 2 or \
                len(set(ea)) != len(ea) or len(set(eb)) != len(eb) or sorted(eo) != sorted(batch + rows + cols):
            return f"einsum {score.args[0]!r} is not a batched matrix product"
        (c,), (r,), (k,) = contract, rows, cols
        ax_a = {ch: ta.axes[i] for i, ch in enumerate(ea)}
        ax_b = {ch: tb.axes[i] for i, ch in enumerate(eb)}
        oa = _Operand(ta, ta.axes, [x for ch in batch for x in ax_a[ch]], ax_a[r], ax_a[c])
        ob = _Operand(tb, tb.axes, [x for ch in batch for x in ax_b[ch]], ax_b[k], ax_b[c])
        spec_out = [("b", eb.index(ch)) if ch == k else ("a", ea.index(ch)) for ch in eo]
        return oa, ob, spec_out, "einsum", None
    la, lb = len(ta.axes), len(tb.axes)
    if la < 2 or lb < 2:
        return "matmul of vectors"
    nb = max(la, lb) - 2
    pad_a = [[] for _ in range(nb - (la - 2))] + ta.axes[:-2]
    pad_b = [[] for _ in range(nb - (lb - 2))] + tb.axes[:-2]
    # matmul broadcasting: a size-1 batch axis on one side becomes a broadcast of the other's size
    for i in range(nb):
        sa, sb = math.prod(x.size for x in pad_a[i]), math.prod(x.size for x in pad_b[i])
        if sa == 1 and sb != 1:
            pad_a[i] = [Atom(sb, None)]
        elif sb == 1 and sa != 1:
            pad_b[i] = [Atom(sa, None)]
        elif sa != sb:
            return f"matmul batch axes differ ({sa} vs {sb})"
    oa = _Operand(ta, pad_a + ta.axes[-2:], [x for ax in pad_a for x in ax], ta.axes[-2], ta.axes[-1])
    ob = _Operand(tb, pad_b + tb.axes[-2:], [x for ax in pad_b for x in ax], tb.axes[-1], tb.axes[-2])
    extra = None
    if t is aten.baddbmm.default:
        a = _normalize(score)
        extra = (a["self"], float(a["beta"]), float(a["alpha"]))
    spec_out = [("a", i) for i in range(nb + 1)] + [("b", nb + 1)]
    return oa, ob, spec_out, t.__name__.split(".")[0], extra


def _group_sizes(atoms: list[Atom], sizes: list[int]) -> list[list[Atom]] | None:
    """Split atoms into consecutive groups with the given products; None if an atom straddles."""
    groups, i = [], 0
    for s in sizes:
        g, p = [], 1
        while p < s and i < len(atoms):
            g.append(atoms[i])
            p *= atoms[i].size
            i += 1
        if p != s:
            return None
        groups.append(g)
    return groups if i == len(atoms) else None


def _emit_canonical(graph, traced: Traced, groups: list[list[Atom]], drop: set[int], anchor) -> torch.fx.Node:
    """Build the traced tensor's values from its source, with axes = groups (each group's atoms
    merged row-major). Broadcast atoms are materialised with expand, except those in `drop` (ids),
    which are left out (the kv-head repeat that vsopt.attention does itself)."""
    em = lambda target, *args: emit(graph, target, args, pass_name=PASS_NAME, meta_from=anchor)  # noqa: E731
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


class SoftmaxAttentionRule:
    """softmax(scale * q @ k^T + mask) @ v, written with matmul / bmm / baddbmm / einsum."""

    name = "softmax"

    def pattern(self, node: torch.fx.Node) -> bool:
        return node.op == "call_function" and node.target in SOFTMAX_OPS

    def _score_path(self, x: torch.fx.Node) -> list[torch.fx.Node] | None:
        """Nodes from the score matmul (first) to x (last), through scale / mask / cast / layout
        ops; None if x does not come from a matmul that way."""
        path = []
        while isinstance(x, torch.fx.Node) and x.op == "call_function":
            path.append(x)
            if x.target in SCORE_OPS:
                return list(reversed(path))
            if x.target in ORDER_OPS or scalar_factor(x) is not None or _is_cast(x) or \
                    x.target in (aten.masked_fill.Scalar,):
                x = x.args[0]
            elif x.target is aten.where.ScalarOther:
                x = x.args[1]
            elif x.target is aten.add.Tensor and len(x.args) == 2 and not x.kwargs:
                for i in (0, 1):
                    sub = self._score_path(x.args[i])
                    if sub is not None:
                        return sub + list(reversed(path))
                return None
            else:
                return None
        return None

    def check(self, sm: torch.fx.Node) -> MatchResult:
        fail = lambda reason: MatchResult.fail(sm, self.name, reason)  # noqa: E731
        path = self._score_path(sm.args[0])
        if path is None:
            blocker = _blocking_op(sm.args[0])
            if blocker is None:  # no matmul feeds this softmax: not an attention at all
                res = fail("softmax input does not come from a matmul")
                res.candidate = False
                return res
            return fail(f"{blocker.name} ({blocker.target}) between the scores and the softmax is not a scalar "
                        "scale, a mask, a cast or a reshape")
        score = path[0]
        got = _operands(score)
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
        masks = []  # (node, kind, axes at that point, scale applied before it, factor on the mask)
        if extra is not None:  # baddbmm: beta * bias + alpha * (q @ k^T)
            bias, beta, alpha = extra
            scale *= alpha
            if beta != 0:
                masks.append((bias, "add", axes, scale, beta))
        try:
            for n in path[1:]:
                f = scalar_factor(n)
                if f is not None:
                    scale *= f
                elif n.target in ORDER_OPS:
                    axes = apply(n, axes, {})
                elif n.target is aten.add.Tensor:
                    prev = path[path.index(n) - 1]
                    other = n.args[1] if n.args[0] is prev else n.args[0]
                    if not isinstance(other, torch.fx.Node):
                        return fail(f"{n.name} adds a constant to the scores")
                    masks.append((other, "add", axes, scale, 1.0))
                elif n.target is aten.masked_fill.Scalar:
                    masks.append(((n.args[1], float(n.args[2])), "fill_where_true", axes, scale, 1.0))
                elif n.target is aten.where.ScalarOther:
                    masks.append(((n.args[0], float(n.args[2])), "fill_where_false", axes, scale, 1.0))
        except TraceError as e:
            return fail(f"cannot follow the scores: {e}")
        if len(masks) > 1:
            return fail("more than one mask is applied to the scores")
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
        got = _operands(pv)
        if isinstance(got, str):
            return fail(got)
        op_p, ov, pv_spec, _, _ = got
        ov = _Operand(ov.traced, ov.axes, ov.batch, token=ov.feature, feature=ov.token)  # v: rows = keys
        if len(op_p.axes) != len(p_axes):
            return fail("the probabilities are broadcast in the value matmul")
        # which axes of the probabilities the value matmul reads as rows and as the contraction
        if pv.target is aten.einsum.default:
            (ea, eb), _eo = _einsum_spec(pv.args[0])
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
            groups = _group_sizes(o.batch, [B, H])
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
        mask = masks[0] if masks else None
        layout = Layout.BN_D if len(axes) == 3 else _layout_of(oq)

        def build(graph: torch.fx.Graph) -> torch.fx.Node:
            q4 = _emit_canonical(graph, oq.traced, [bq, hq, oq.token, oq.feature], set(), sm)
            o_k, bk, hk_, dk = kv["k"]
            k4 = _emit_canonical(graph, o_k.traced, [bk, hk_, o_k.token, o_k.feature], dk, sm)
            o_v, bv, hv_, dv = kv["v"]
            v4 = _emit_canonical(graph, o_v.traced, [bv, hv_, o_v.token, o_v.feature], dv, sm)
            m4 = _emit_mask(graph, mask, scale, [bq, hq, oq.token, ok_.token], sm) if mask else None
            out = emit(graph, torch.ops.vsopt.attention.default, (q4, k4, v4, m4, scale, False),
                       pass_name=PASS_NAME, replaces=tuple(n.name for n in path + probs_path + [pv]), meta_from=sm)
            return _emit_output(graph, out, [bq, hq, oq.token, ov.feature], out_axes, pv, sm)

        # one rule name whatever the matmul spelling: torch.compile's graphs lower matmul and einsum
        # to bmm while torch.export's keep them, and a site must read the same in both
        m = Match(rule=self.name, anchor=sm, output=pv, layout=layout, batch=B, heads=H,
                  kv_heads=hk, head_dim=D, value_dim=Dv, q_len=Nq, kv_len=Nk, dtype=oq.traced.source.meta["val"].dtype, scale=scale, has_mask=mask is not None, is_causal=False,
                  nodes=tuple(n.name for n in path + probs_path + [pv]),
                  q_token_source=_token_axes(oq), build=build)
        return MatchResult(node=sm, rule=self.name, match=m)


def _blocking_op(x: torch.fx.Node, depth: int = 6) -> torch.fx.Node | None:
    """If a matmul reaches the softmax input within `depth` ops along first arguments, the op
    nearest the matmul that the score path does not accept (so the skip can name it)."""
    chain = []
    while isinstance(x, torch.fx.Node) and x.op == "call_function" and len(chain) < depth:
        if x.target in SCORE_OPS:
            rule = SoftmaxAttentionRule()
            for n in reversed(chain):  # nearest the matmul first
                if rule._score_path(n) is None:
                    return n
            return chain[0] if chain else None
        chain.append(x)
        args = [a for a in x.args if isinstance(a, torch.fx.Node)]
        if not args:
            return None
        x = args[0]
    return None


def _is_dropout_active(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and n.target in DROPOUT_OPS and not _is_noop_dropout(n)


def _layout_of(o: _Operand) -> Layout:
    """BNHD when, in q's source, the token axis comes before the head axis."""
    src_axis = {a.id: a.source_axis for ax in o.traced.source_atoms for a in ax}
    tok = [src_axis[a.id] for a in o.token if a.id in src_axis]
    heads = [src_axis[a.id] for a in o.batch[1:] if a.id in src_axis]
    if tok and heads and min(tok) < min(heads):
        return Layout.BNHD
    return Layout.BHND


def _token_axes(o: _Operand) -> tuple[torch.fx.Node, list[int]]:
    axes = sorted({a.source_axis for a in o.token if a.source_axis is not None})
    return (o.traced.source, axes)


def _emit_mask(graph, mask, scale_total: float, groups: list[list[Atom]], anchor) -> torch.fx.Node:
    """The mask as a tensor broadcastable to (B, H, Nq, Nk): boolean (True = keep) for -inf fills,
    else additive, multiplied by any scale applied after it."""
    em = lambda target, *args: emit(graph, target, args, pass_name=PASS_NAME, meta_from=anchor)  # noqa: E731
    node, kind, axes, scale_before, factor = mask
    if kind == "add":
        m = node
    else:
        cond, value = node
        keep_is_true = kind == "fill_where_false"
        if value == float("-inf"):
            m = cond if keep_is_true else em(aten.logical_not.default, cond)
        else:  # finite fill: additive value where dropped, 0 where kept (exact: |score| << |value|)
            dropped = em(aten.logical_not.default, cond) if keep_is_true else cond
            as_float = emit(graph, aten._to_copy.default, (dropped,), {"dtype": torch.float32},
                            pass_name=PASS_NAME, meta_from=anchor)
            m = em(aten.mul.Tensor, as_float, value)
            kind = "add"
    if kind == "add" and m.meta["val"].dtype != torch.bool:
        # the model scaled the mask by `factor` and by every scale applied after it was added
        after = factor * (scale_total / scale_before if scale_before else 1.0)
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


def _emit_output(graph, out: torch.fx.Node, groups: list[list[Atom]], out_axes: list[list[Atom]],
                 pv: torch.fx.Node, anchor) -> torch.fx.Node:
    """Lay the canonical (B, H, Nq, Dv) result out as the value matmul's output was."""
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


DEFAULT_RULES = [SdpaRule(name) for name in SDPA_OPS] + [SoftmaxAttentionRule()]
