"""cancel_permutations: keep token-wise parts of the graph in PARO order instead of undoing and
redoing the same token permutation around them.

A token permutation P commutes with every token-wise op (an op that treats each token on its own:
elementwise ops, linear layers and norms over the feature axis, reshapes that keep the token
axis whole, ...): f(P x) = P f(x). So after lower_plan, where consecutive sites run in the same
order,

    before:  o1 = unpermute_tokens(a1, P) -> transpose -> view -> linear -> add(x) -> norm -> linear
             -> view -> transpose -> q2 = permute_tokens(., P) -> block_sparse_attention ...
    after:   a1 -> transpose -> view -> linear -> add(index_select(x, P)) -> norm -> ... -> q2 = .

The pass grows, per permutation P, a region of token-wise nodes forward from every
unpermute_tokens(., P) and from every value that had to be permuted to enter the region, and
computes the whole region in P order:
  - an unpermute_tokens(x, P) feeding the region is bypassed (its users in the region read x);
  - a permute_tokens(y, P) whose input is in the region, with the token axis where it expects it,
    disappears (its users read y);
  - a value from outside that carries the token axis (the residual stream, RoPE tables) enters
    through one index_select (an "entry"); one without it (weights, biases, (B, 1, C)
    modulation) needs nothing;
  - a region value used outside the region leaves through one inverse index_select (an "exit").
The rewrite is applied only when it removes more permutations than it adds.

What stops a region (the cases where cancelling would be WRONG): a permutation that differs per
head (heads are mixed by the output projection, so no single token order exists after it); an
op that mixes tokens (a reduction, softmax, split or cat along the token axis, a matmul that
contracts it, attention itself); a reshape that merges the token axis with a neighbour in a way
that is not a whole block; any op not known to be token-wise.

The token axis of a value is (dim, inner): along dimension `dim`, of size outer * N * inner, the
token index t sits at positions (o * N + t) * inner + i; (B * N, C) after flattening batch and
tokens is (0, 1).
"""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from vsopt.core import ops as vsopt_ops  # noqa: F401  (registers torch.ops.vsopt.*)
from vsopt.core.ops import attention_arguments

from .graph_edit import constant, emit
from .infra import GraphChanges, PassContext, PassReport

NAME = "cancel_permutations"
aten = torch.ops.aten
vsopt = torch.ops.vsopt


@dataclass(frozen=True)
class Axis:
    """Where the token index lives in a tensor: dimension `dim`, with `inner` elements per token."""

    dim: int
    inner: int = 1


# ---------------------------------------------------------------------------------------- ops

# ops whose output has the token axis of their first argument (later arguments give only dtypes)
_SAME_AXIS = {aten.clone.default, aten._to_copy.default, aten.alias.default, aten.detach.default,
              aten.contiguous.default, aten.lift_fresh_copy.default, aten.to.dtype, aten.to.dtype_layout,
              aten.to.device, aten.to.other, aten.type_as.default, aten.empty_like.default}
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints, aten.unflatten.int}
# single-input ops through which an entry can move up, so that values derived from one tensor
# (RoPE tables sliced per block) enter once
_HOISTABLE = _SAME_AXIS | _VIEWS | {aten.slice.Tensor, aten.select.int, aten.transpose.int, aten.permute.default,
                                    aten.expand.default, aten.t.default}
# users that only read metadata (shape, dtype): they may see either order
_METADATA_USERS = {aten._assert_tensor_metadata.default}
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
           aten.var_mean.correction}
_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}


def _shape(x) -> tuple[int, ...] | None:
    v = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if isinstance(v, torch.Tensor):
        if not all(is_concrete_int(s) for s in v.shape):  # symbolic (or data-dependent) sizes: unknown here
            return None
        return tuple(int(s) for s in v.shape)
    return None


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _view_axis(a: Axis, src: tuple[int, ...], dst: tuple[int, ...], n: int) -> Axis | None:
    """The token axis after a row-major reshape src -> dst, or None if it is cut across dims."""
    step = a.inner * math.prod(src[a.dim + 1:])  # flat elements per token
    for b in range(len(dst)):
        below = math.prod(dst[b + 1:])
        if below <= step and step % below == 0 and (below * dst[b]) % (step * n) == 0:
            return Axis(b, step // below)
    return None


class _Region:
    """The region of one permutation: the nodes computed in permuted order and their token axes."""

    def __init__(self, n: int):
        self.n = n
        self.axis: dict[torch.fx.Node, Axis | tuple[Axis | None, ...]] = {}  # region nodes (and sources)
        self.sources: set[torch.fx.Node] = set()  # unpermute_tokens(x, P): read as x
        self.entries: dict[torch.fx.Node, Axis] = {}  # outside values permuted to enter

    def axis_of(self, x) -> Axis | None:
        a = self.axis.get(x) if isinstance(x, torch.fx.Node) else None
        if a is None and isinstance(x, torch.fx.Node):
            a = self.entries.get(x)
        return a if isinstance(a, Axis) else None

    def hoist(self, e: torch.fx.Node, ax: Axis) -> tuple[torch.fx.Node, Axis]:
        """Move the entry of e (token axis ax) up through _HOISTABLE producers: e joins the region
        and its input enters instead, with the axis that gives e's. Returns the entry to add."""
        while e.op == "call_function" and e.target in _HOISTABLE and e not in self.axis:
            a = e.args[0]
            shape = _shape(a)
            if not isinstance(a, torch.fx.Node) or a in self.axis or shape is None:
                break
            if any(x is not a for x in e.all_input_nodes) and e.target not in (aten.type_as.default, aten.to.other):
                break
            existing = self.entries.get(a)
            candidates = [existing] if existing is not None else [
                Axis(d, inner) for d, size in enumerate(shape) if size % self.n == 0
                for inner in range(1, size // self.n + 1) if (size // self.n) % inner == 0]
            found = None
            for cand in candidates:
                self.entries[a] = cand
                got, new = self.infer(e)
                if existing is None:
                    del self.entries[a]
                if got == ax and not new:
                    found = cand
                    break
            if found is None:
                break
            self.entries.pop(e, None)
            self.axis[e] = ax  # computed in the region, from the permuted input
            if existing is not None:
                return a, existing
            e, ax = a, found
        return e, ax

    def infer(self, node: torch.fx.Node) -> tuple[Axis | tuple | None, dict[torch.fx.Node, Axis]]:
        """(output axis, new entries) if `node` is token-wise given the region, else (None, {})."""
        t, args = node.target, node.args
        n = self.n
        out_shape = _shape(node)
        if t is aten.copy_.default:
            return self._copy(node)
        if isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable:
            return None, {}  # other in-place or out= ops: leave them alone
        if t is operator.getitem:
            a = self.axis.get(args[0])
            return (a[args[1]] if isinstance(a, tuple) and args[1] < len(a) else None), {}
        if t is aten.addmm.default:  # bias + a @ b, tokens on the rows of a
            a_ax = self.axis_of(args[1])
            ok = a_ax is not None and a_ax.dim == 0 and self.axis_of(args[0]) is None \
                and self.axis_of(args[2]) is None and len(_shape(args[0]) or (0, 0)) <= 1
            return (a_ax if ok else None), {}
        x = args[0] if args else None
        ax = self.axis_of(x)
        if isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
            return self._pointwise(node, out_shape)
        if ax is None:
            return None, {}
        src = _shape(x)
        if src is None:
            return None, {}
        if t in _SAME_AXIS:
            return ax, {}
        if t is aten.dropout.default:  # only when it is the identity (eval, or p = 0): keeps results exact
            p, train = (list(args[1:3]) + [0.0, False])[:2]
            return (ax if not train or p == 0 else None), {}
        if t is vsopt.attention.default:
            return self._attention(node, ax), {}
        if t in _VIEWS and out_shape is not None:
            return _view_axis(ax, src, out_shape, n), {}
        if t is aten.transpose.int:
            d0, d1 = (_norm_dim(d, len(src)) for d in args[1:3])
            swap = {d0: d1, d1: d0}
            return Axis(swap.get(ax.dim, ax.dim), ax.inner), {}
        if t is aten.permute.default:
            dims = [_norm_dim(d, len(src)) for d in args[1]]
            return Axis(dims.index(ax.dim), ax.inner), {}
        if t is aten.t.default:
            return Axis(1 - ax.dim, ax.inner), {}
        if t is aten.expand.default and out_shape is not None:
            return Axis(ax.dim + len(out_shape) - len(src), ax.inner), {}
        if t in (aten.view_as_complex.default, aten.view_as_real.default):
            return (ax if ax.dim < len(src) - 1 else None), {}
        if t in (aten.mm.default, aten.matmul.default, aten.linear.default):
            # rows of the left operand: (P a) @ b = P (a @ b) whatever b is
            other = args[1]
            ok = ax.dim < len(src) - 1 and self.axis_of(other) is None and len(_shape(other) or ()) <= 2
            return (ax if ok else None), {}
        if t is aten.bmm.default:
            ok = ax.dim == 1 and self.axis_of(args[1]) is None
            return (ax if ok else None), {}
        if t in (aten.native_layer_norm.default, aten._fused_rms_norm.default):  # (out, stats...)
            ok = ax.dim < len(src) - len(args[1])
            return ((ax,) * (3 if t is aten.native_layer_norm.default else 2) if ok else None), {}
        if t in (aten.layer_norm.default, aten.rms_norm.default):
            ok = ax.dim < len(src) - len(args[1])
            return (ax if ok else None), {}
        if t in _REDUCE:
            dims = args[1] if len(args) > 1 and args[1] is not None else list(range(len(src)))
            dims = sorted({_norm_dim(d, len(src)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])})
            keep = node.kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
            if ax.dim in dims or (t is aten.var_mean.correction):
                return None, {}
            return Axis(ax.dim if keep else ax.dim - sum(d < ax.dim for d in dims), ax.inner), {}
        if t in _SOFTMAX:
            return (ax if _norm_dim(args[1], len(src)) != ax.dim else None), {}
        if t in _SPLITS:
            dim = _norm_dim(args[2] if len(args) > 2 else node.kwargs.get("dim", 0), len(src)) \
                if t is not aten.unbind.int else _norm_dim(args[1] if len(args) > 1 else 0, len(src))
            if dim == ax.dim:
                return None, {}
            val = node.meta.get("val")
            count = len(val) if isinstance(val, (list, tuple)) else 0
            out = Axis(ax.dim - (1 if t is aten.unbind.int and dim < ax.dim else 0), ax.inner)
            return (tuple([out] * count) if count else None), {}
        if t in (aten.slice.Tensor, aten.select.int):
            dim = _norm_dim(args[1] if len(args) > 1 else 0, len(src))
            if dim == ax.dim:
                return None, {}
            return Axis(ax.dim - (1 if t is aten.select.int and dim < ax.dim else 0), ax.inner), {}
        return None, {}

    def _copy(self, node: torch.fx.Node) -> tuple[Axis | None, dict]:
        """copy_(dst, src) writes src into dst, broadcasting: token-wise when dst is in the region
        (never an entry, whose write would land in a copy); src is read like a pointwise input."""
        dst = node.args[0]
        if not isinstance(self.axis.get(dst), Axis):
            return None, {}
        ax, entries = self._pointwise(node, _shape(dst))
        return (ax if ax == self.axis[dst] and dst not in entries else None), entries

    def _attention(self, node: torch.fx.Node, q_ax: Axis) -> Axis | None:
        """Dense attention without mask is equivariant in its queries: attention(P q, k, v) =
        P attention(q, k, v), with k and v both as they were or both permuted by P."""
        a = attention_arguments(node.args, node.kwargs)
        if a["attn_mask"] is not None or a["is_causal"] or q_ax != Axis(2, 1):
            return None
        k_ax, v_ax = self.axis_of(a["k"]), self.axis_of(a["v"])
        both_permuted = k_ax == v_ax == Axis(2, 1)
        return q_ax if both_permuted or (k_ax is None and v_ax is None) else None

    def _pointwise(self, node: torch.fx.Node, out_shape) -> tuple[Axis | None, dict]:
        """Elementwise op with broadcasting: the token axis of the output, from the inputs in the
        region; other inputs must not carry the token dim (broadcast or absent) or enter."""
        if out_shape is None:
            return None, {}
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node) and _shape(a) is not None]
        out_ax = None
        for a in tensors:
            ax = self.axis_of(a)
            if ax is not None:
                cand = Axis(ax.dim + len(out_shape) - len(_shape(a)), ax.inner)
                if out_ax not in (None, cand) or _shape(a)[ax.dim] != out_shape[cand.dim]:
                    return None, {}
                out_ax = cand
        if out_ax is None:
            return None, {}
        entries = {}
        for a in tensors:
            if self.axis_of(a) is not None:
                continue
            s = _shape(a)
            d = out_ax.dim - (len(out_shape) - len(s))
            if d < 0 or s[d] == 1:
                continue  # broadcast over tokens: order does not matter
            if s[d] != out_shape[out_ax.dim]:
                return None, {}
            entries[a] = Axis(d, out_ax.inner)
        return out_ax, entries


def _mutates(user: torch.fx.Node, value: torch.fx.Node) -> bool:
    """Whether `user` may write into `value` (an exit would then divert the write to a copy)."""
    t = user.target
    if not isinstance(t, torch._ops.OpOverload) or not t._schema.is_mutable:
        return False
    return any(a.alias_info is not None and a.alias_info.is_write and i < len(user.args) and user.args[i] is value
               for i, a in enumerate(t._schema.arguments)) or value in user.kwargs.values()


def _is(node: torch.fx.Node, op) -> bool:
    return node.op == "call_function" and node.target in (op.default, op)


def _single_perm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
    """The permutation of a permute/unpermute node when one order serves every head, else None."""
    p = node.args[1]
    if not isinstance(p, torch.fx.Node) or p.op != "get_attr":
        return None
    perm = getattr(gm, p.target, None)
    if not isinstance(perm, torch.Tensor) or perm.dim() != 2:
        return None
    if perm.shape[0] > 1 and not bool((perm == perm[:1]).all()):
        return None  # per-head orders: heads get mixed after attention, no single token order
    return perm[0].cpu()


@dataclass
class _Plan:
    """What cancelling one permutation would do."""

    perm: torch.Tensor
    region: _Region
    sinks: list[torch.fx.Node] = field(default_factory=list)  # permute_tokens nodes that disappear
    exits: list[torch.fx.Node] = field(default_factory=list)  # region values used outside
    blocked: str = ""  # why the region cannot be rewritten at all

    @property
    def free_sources(self) -> list[torch.fx.Node]:
        """The unpermute_tokens that disappear: all their users are in the region or sinks."""
        return [s for s in self.region.sources
                if all(u in self.region.axis or u in self.sinks or u.target in _METADATA_USERS for u in s.users)]

    @property
    def gain(self) -> int:
        if self.blocked:
            return -1
        removed = len(self.sinks) + len(self.free_sources)
        return removed - len(self.region.entries) - len(self.exits)


def _grow(gm: torch.fx.GraphModule, perm: torch.Tensor, unperms: list[torch.fx.Node],
          perms: list[torch.fx.Node], hoist: bool) -> _Plan:
    n = perm.numel()
    region = _Region(n)
    for u in unperms:
        region.axis[u] = Axis(2, 1)
        region.sources.add(u)
    sink_set = set(perms)
    changed = True
    while changed:  # sweep the graph in topological order until the region stops growing
        changed = False
        for node in gm.graph.nodes:
            if node in region.axis or node in sink_set or node.op != "call_function":
                continue
            if not any(region.axis_of(a) is not None or a in region.axis for a in node.all_input_nodes):
                continue
            ax, entries = region.infer(node)
            if ax is None:
                continue
            if node in region.entries:  # it can be computed in the region instead of entering it
                if ax != region.entries[node]:
                    continue
                del region.entries[node]
            region.axis[node] = ax
            for e, e_ax in entries.items():
                if hoist:
                    e, e_ax = region.hoist(e, e_ax)
                region.entries.setdefault(e, e_ax)
            changed = True
    plan = _Plan(perm, region)
    for p in perms:
        shape = _shape(p.args[0])
        if region.axis_of(p.args[0]) == Axis(2, 1) and shape is not None and shape[2] == n:
            plan.sinks.append(p)
    for v, ax in region.axis.items():
        if v in region.sources:
            continue
        if any(_mutates(u, v) and u not in region.axis for u in v.users):
            plan.blocked = f"{v.name} is mutated in place by a user "
            continue
        if any(u not in region.axis and u not in plan.sinks and u.target not in _METADATA_USERS for u in v.users):
            if not isinstance(ax, Axis):
                plan.blocked = f"{v.name} (a tuple) is read outside the region"
                continue
            plan.exits.append(v)
    return plan


def _index(perm: torch.Tensor, size: int, ax: Axis) -> torch.Tensor:
    """Flat index along a dim of `size` = outer * N * inner that applies perm to the token factor."""
    n = perm.numel()
    outer = size // (n * ax.inner)
    idx = (torch.arange(outer)[:, None, None] * n + perm[None, :, None]) * ax.inner + torch.arange(ax.inner)
    return idx.reshape(-1)


def _apply(gm: torch.fx.GraphModule, plan: _Plan, tag: str, labels: "itertools.count[int]") -> None:
    """Rewrite the region of `plan` to run in its permutation's order. `labels` numbers the
    index constants of the whole pass run (each reorder takes two numbers: its constant and its
    index_select), so that their buffer names stay apart."""
    graph, region, perm = gm.graph, plan.region, plan.perm
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel()))

    def reorder(value: torch.fx.Node, ax: Axis, p: torch.Tensor, label: str) -> torch.fx.Node:
        size = _shape(value)[ax.dim]
        number = next(labels)
        next(labels)
        idx = constant(gm, f"_vsopt_{tag}_{label}{number}", _index(p, size, ax), like=value, pass_name=NAME)
        return emit(graph, aten.index_select.default, (value, ax.dim, idx), pass_name=NAME,
                    replaces=(value.name,), meta_from=value)

    # entries: the permuted copy of each outside value, read by region nodes only
    for value, ax in region.entries.items():
        position = {node: i for i, node in enumerate(graph.nodes)}
        anchor = min((u for u in value.users if u in region.axis), key=position.get)
        with graph.inserting_before(anchor):
            entered = reorder(value, ax, perm, "enter")
        for u in list(value.users):
            if u in region.axis:
                u.replace_input_with(value, entered)
    # exits: undo the order for users outside the region
    for value in plan.exits:
        ax = region.axis[value]
        outside = [u for u in value.users
                   if u not in region.axis and u not in plan.sinks and u.target not in _METADATA_USERS]
        position = {node: i for i, node in enumerate(graph.nodes)}
        with graph.inserting_before(min(outside, key=position.get)):
            left = reorder(value, ax, inverse, "exit")
        for u in outside:
            u.replace_input_with(value, left)
    # sources: region users read the permuted input of unpermute_tokens
    for s in region.sources:
        for u in list(s.users):
            if u in region.axis or u in plan.sinks or u.target in _METADATA_USERS:
                u.replace_input_with(s, s.args[0])
        if not s.users:
            graph.erase_node(s)
    # sinks: already in permuted order
    for p in plan.sinks:
        p.replace_all_uses_with(p.args[0])
        graph.erase_node(p)


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
    report = PassReport(NAME)
    changes = GraphChanges(gm.graph)
    labels = itertools.count()
    by_perm: dict[tuple, tuple[torch.Tensor, list, list]] = {}
    for node in gm.graph.nodes:
        for op, slot in ((vsopt.unpermute_tokens, 1), (vsopt.permute_tokens, 2)):
            if _is(node, op):
                perm = _single_perm(gm, node)
                if perm is None:
                    continue
                key = tuple(perm.tolist())
                entry = by_perm.setdefault(key, (perm, [], []))
                entry[slot].append(node)
    for i, (perm, unperms, perms) in enumerate(by_perm.values()):
        if not unperms or not perms:
            continue
        plan = max((_grow(gm, perm, unperms, perms, hoist) for hoist in (True, False)), key=lambda p: p.gain)
        if plan.gain <= 0:
            report.notes.append(f"order {i}: not cancelled {plan.blocked}({len(plan.sinks)} permutes and "
                                f"{len(plan.free_sources)} unpermutes would go, {len(plan.region.entries)} "
                                f"entries and {len(plan.exits)} exits would come)")
            continue
        _apply(gm, plan, f"order{i}", labels)
        report.notes.append(f"order {i}: removed {len(plan.sinks)} permute_tokens and "
                            f"{len(plan.free_sources)} unpermute_tokens, added {len(plan.region.entries)} "
                            f"entries and {len(plan.exits)} exits (index_select)")
    return changes.record(report)
