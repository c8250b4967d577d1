"""Follow a tensor through reshapes, transposes and broadcasts, axis by axis (a helper of the
attention rules, not a pass).

Attention reaches its matmuls in many layouts: (B, H, N, D) tensors, (B, N, H, D) tensors seen
through a transpose, heads merged into the batch axis ((B*H, N, D) for bmm), einsum's unsqueeze /
permute / view dance, and expanded key/value heads for MQA/GQA. Instead of one pattern per
spelling, every tensor on such a chain is described by its *atoms*: each axis is a row-major list
of Atoms, and an Atom is one index of some source tensor (or a broadcast, which has no source).

    k: (B, Hkv, N, D)            axes [[b], [h], [n], [d]]
    unsqueeze(2), expand(rep)    axes [[b], [h], [<bcast rep>], [n], [d]]
    reshape(B, H, N, D)          axes [[b], [h, <bcast rep>], [n], [d]]      (GQA, repeat_interleave)
    transpose(-2, -1)            axes [[b], [h, <bcast rep>], [d], [n]]
    expand + view(B*H, D, N)     axes [[b, h, <bcast rep>], [d], [n]]        (bmm operand)

From the atoms of a matmul operand, `to_canonical` rebuilds the same values in (B, H, N, D) layout
from the source tensor with one reshape, one permute and one reshape (all views where possible).
Only ops that move elements without changing them are followed (ORDER_OPS); scalar mul/div are
followed where the caller asks, and their factor is returned so it can join the softmax scale.
"""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, is_concrete_int

aten = torch.ops.aten

_ids = itertools.count()


@dataclass(eq=False)
class Atom:
    """One index of a tensor axis: `size` values of source axis `source_axis`, split from it where
    a reshape divided that axis (parent -> (outer, inner)). A broadcast atom has source_axis None."""

    size: int
    source_axis: int | None
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def is_broadcast(self) -> bool:
        return self.source_axis is None

    def __repr__(self) -> str:
        return f"<{'bcast' if self.is_broadcast else f's{self.source_axis}'}:{self.size}>"


Axes = list[list[Atom]]  # per tensor axis, its atoms in row-major order (size-1 atoms dropped)
Groups = tuple[tuple[Atom, ...], ...]  # frozen Axes: per canonical axis, its atoms (merged row-major)


class TraceError(Exception):
    """The chain cannot be described by atoms (an op that changes values, an indivisible reshape)."""


@dataclass
class Traced:
    """A tensor described as a rearrangement of `source`.

    source_atoms: per source axis, the leaf atoms it was split into (row-major), so that
    source.reshape(leaf sizes) exposes every atom as its own axis.
    axes: the atoms of the traced tensor, per axis.
    scale: product of the scalar multiplications followed on the way (1.0 if none).
    nodes: the nodes walked through (from the traced tensor back to the source, exclusive).
    """

    source: torch.fx.Node
    source_atoms: list[list[Atom]]
    axes: Axes
    scale: float = 1.0
    nodes: list[torch.fx.Node] = field(default_factory=list)


def shape_of(node) -> tuple[int, ...]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise TraceError(f"node {getattr(node, 'name', node)!r} has no tensor metadata (meta['val'])")
    return tuple(_as_int(s) for s in val.shape)


def _as_int(s) -> int:
    if isinstance(s, int):
        return s
    if is_concrete_int(s):
        return int(s)
    # The rewrite emits reshapes with fixed sizes, which would be wrong for other input shapes.
    if free_unbacked_symbols(s):
        raise TraceError(f"size {s} depends on the data (e.g. text cut to its unpadded length by a mask), not on the "
                         "input shapes: this site is not detected and runs as the model wrote it (dense, exact); "
                         "lower_plan splits such joint sites once detection gives their static video part "
                         "(issue 14, class 1)")
    raise TraceError(f"size {s} is symbolic (dynamic shapes: torch.compile(dynamic=True) or automatic dynamic "
                     "after a shape change); compile with dynamic=False to rewrite this site")


# Ops that rearrange or copy elements without changing them (dtype casts are not here on purpose:
# a model that casts q to float32 computes attention in float32, and the rewrite must keep that).
ORDER_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.expand.default, aten.clone.default, aten.contiguous.default,
    aten.alias.default, aten.detach.default, aten.flatten.using_ints, aten.unflatten.int,
}
SCALAR_SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


def einsum_terms(eq: str) -> tuple[list[str], str] | None:
    """An explicit einsum equation's operand and output subscripts: 'bhnd,bhmd->bhnm' ->
    (['bhnd', 'bhmd'], 'bhnm'); None for an implicit output ('->' missing) or an ellipsis."""
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    return ins.split(","), out


def scalar_factor(node: torch.fx.Node) -> float | None:
    """If node multiplies or divides its first argument by a Python number, the factor; else None."""
    if node.op != "call_function" or node.target not in SCALAR_SCALE_OPS or len(node.args) != 2 or node.kwargs:
        return None
    other = node.args[1]
    if not isinstance(other, numbers.Number) or isinstance(other, bool) or not isinstance(node.args[0], torch.fx.Node):
        return None
    if node.target in (aten.div.Tensor, aten.div.Scalar):
        return None if other == 0 else 1.0 / float(other)
    return float(other)


def trace_back(node: torch.fx.Node, *, follow_scale: bool) -> Traced:
    """Walk from `node` back through ORDER_OPS (and scalar mul/div if follow_scale) to the first
    node that is none of them (the source), then replay the walk forward on atoms."""
    chain, scale, cur = [], 1.0, node
    while isinstance(cur, torch.fx.Node) and cur.op == "call_function":
        if cur.target in ORDER_OPS:
            chain.append(cur)
            cur = cur.args[0]
            continue
        factor = scalar_factor(cur) if follow_scale else None
        if factor is None:
            break
        chain.append(cur)
        scale *= factor
        cur = cur.args[0]
    source = cur
    src_shape = shape_of(source)
    source_atoms = [[Atom(s, i)] if s != 1 else [] for i, s in enumerate(src_shape)]
    axes: Axes = [list(a) for a in source_atoms]
    splits: dict[int, tuple[Atom, Atom]] = {}
    for n in reversed(chain):
        axes = apply(n, axes, splits)
    return Traced(source, [_leaves(axis, splits) for axis in source_atoms], axes, scale, chain)


def _leaves(atoms: list[Atom], splits: dict[int, tuple[Atom, Atom]]) -> list[Atom]:
    out = []
    for a in atoms:
        if a.id in splits:
            out += _leaves(list(splits[a.id]), splits)
        else:
            out.append(a)
    return out


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def apply(node: torch.fx.Node, axes: Axes, splits: dict[int, tuple[Atom, Atom]]) -> Axes:
    """The atoms of node's output, given the atoms of its first input."""
    t, args = node.target, node.args
    ndim = len(axes)
    if scalar_factor(node) is not None or t in (aten.clone.default, aten.contiguous.default, aten.alias.default,
                                                 aten.detach.default):
        return axes
    if t is aten.permute.default:
        return [axes[_norm_dim(d, ndim)] for d in args[1]]
    if t is aten.transpose.int:
        d0, d1 = _norm_dim(args[1], ndim), _norm_dim(args[2], ndim)
        out = list(axes)
        out[d0], out[d1] = axes[d1], axes[d0]
        return out
    if t is aten.t.default:
        return list(reversed(axes))
    if t is aten.unsqueeze.default:
        out = list(axes)
        out.insert(_norm_dim(args[1], ndim + 1), [])
        return out
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        dims = range(ndim) if t is aten.squeeze.default else ([args[1]] if t is aten.squeeze.dim else args[1])
        drop = {_norm_dim(d, ndim) for d in dims}
        return [a for i, a in enumerate(axes) if i not in drop or _size(a) != 1]
    if t is aten.expand.default:
        target = [_as_int(s) for s in args[1]]
        axes = [[] for _ in range(len(target) - ndim)] + list(axes)
        out = []
        for a, s in zip(axes, target):
            if s == -1 or s == _size(a):
                out.append(a)
            elif _size(a) == 1:
                out.append([Atom(s, None)])
            else:
                raise TraceError(f"expand of an axis of size {_size(a)} to {s}")
        return out
    if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
             aten.unflatten.int):
        return _reshape(axes, list(shape_of(node)), splits)
    raise TraceError(f"cannot follow {t}")


def _size(atoms: list[Atom]) -> int:
    return math.prod(a.size for a in atoms)


def _reshape(axes: Axes, out_shape: list[int], splits: dict[int, tuple[Atom, Atom]]) -> Axes:
    """Regroup the row-major atom sequence into out_shape, splitting an atom where an output axis
    ends inside it (recorded in splits, so the source can be reshaped the same way)."""
    queue = [a for axis in axes for a in axis]
    out: Axes = []
    for s in out_shape:
        group, need = [], s
        while need > 1:
            if not queue:
                raise TraceError(f"reshape to {out_shape} does not match the input's size")
            a = queue.pop(0)
            if a.size <= need:
                if need % a.size:
                    raise TraceError(f"reshape to {out_shape} cuts an axis of size {a.size}")
                group.append(a)
                need //= a.size
            else:
                if a.size % need:
                    raise TraceError(f"reshape to {out_shape} cuts an axis of size {a.size}")
                outer, inner = Atom(need, a.source_axis), Atom(a.size // need, a.source_axis)
                splits[a.id] = (outer, inner)
                group.append(outer)
                queue.insert(0, inner)
                need = 1
        out.append(group)
    if queue:
        raise TraceError(f"reshape to {out_shape} does not match the input's size")
    return out
