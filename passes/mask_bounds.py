"""Proving from the graph that an attention mask keeps every video x video pair.

A split joint site (vsopt.core.joint) runs the block-sparse kernel over video rows x video keys,
where it takes no mask: the model's mask must be all-true there (boolean) or all zero (additive).
This module proves it, or says why it cannot, by interval analysis over the mask's producers:
bounds(node, box) gives (lo, hi) with lo <= x <= hi for every element of `node`'s value inside
`box` (a [start, stop) range per dim). Each op has a sound rule (constants, arange, comparisons,
masked_fill / where, arithmetic, sums, casts, broadcasts and the views that move elements); an op
without one is bounded by its dtype only (bool: [0, 1], numbers: unbounded), so a mask is never
taken for all-true by accident. Inputs are unknown: HunyuanVideo's key-padding mask
(ones.masked_fill(arange >= video + sum(text_mask), False)) is proved when the text mask input is
boolean (its sum is >= 0), or converted to one in the graph (mask.bool(), mask > 0, mask != 0),
not when it is an integer tensor used as it is, whose sum could be negative: the reason then names
that input and says to pass it as mask.bool().

Reads only shapes and dtypes (meta["val"]) and constant buffers; never runs the model.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

aten = torch.ops.aten
INF = math.inf
Box = tuple  # per dim (start, stop); stop None = to the end (a symbolic size)

_CONST = {aten.ones.default: 1, aten.ones_like.default: 1, aten.new_ones.default: 1, aten.zeros.default: 0,
          aten.zeros_like.default: 0, aten.new_zeros.default: 0}
_FULL = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2, aten.scalar_tensor.default: 0}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.alias.default,
          aten.detach.default, aten.contiguous.default, aten.lift_fresh_copy.default, aten.to.device}
_MOVES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.repeat.default,
          aten.flatten.using_ints, aten.unflatten.int, aten.index.Tensor, aten.index_select.default,
          aten.gather.default, aten.repeat_interleave.self_int, aten.squeeze.dims, aten.squeeze.default,
          aten.t.default, aten.amax.default, aten.amin.default}
_CMP = {aten.ge.Tensor: "ge", aten.ge.Scalar: "ge", aten.gt.Tensor: "gt", aten.gt.Scalar: "gt",
        aten.le.Tensor: "le", aten.le.Scalar: "le", aten.lt.Tensor: "lt", aten.lt.Scalar: "lt",
        aten.eq.Tensor: "eq", aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne"}
_AND = {aten.logical_and.default, aten.bitwise_and.Tensor, aten.__and__.Tensor}
_OR = {aten.logical_or.default, aten.bitwise_or.Tensor, aten.__or__.Tensor}
_NOT = {aten.logical_not.default, aten.bitwise_not.default}


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _size(s) -> int | None:
    return int(s) if isinstance(s, int) or is_concrete_int(s) else None


def _full_box(n) -> Box:
    return tuple((0, _size(s)) for s in _val(n).shape)


def _dtype_bounds(dtype: torch.dtype) -> tuple[float, float]:
    return (0.0, 1.0) if dtype == torch.bool else (-INF, INF)


def _hull(*bs):
    return min(b[0] for b in bs), max(b[1] for b in bs)


def _truth(always: bool, never: bool) -> tuple[float, float]:
    """Bounds of a boolean that is certainly true (always), certainly false (never), or either."""
    return (1.0, 1.0) if always else ((0.0, 0.0) if never else (0.0, 1.0))


class MaskBounds:
    """Interval bounds of graph values over index boxes (memoized per graph)."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self._memo: dict[tuple, tuple[float, float]] = {}

    def bounds(self, n: Any, box: Box | None = None) -> tuple[float, float]:
        if not isinstance(n, torch.fx.Node):
            if isinstance(n, bool):
                return (float(n), float(n))
            if isinstance(n, (int, float)):
                return (float(n), float(n))
            v = _size(n) if not isinstance(n, torch.SymFloat) else None
            return (float(v), float(v)) if v is not None else (-INF, INF)
        val = _val(n)
        if not isinstance(val, torch.Tensor):
            return (-INF, INF)
        box = _full_box(n) if box is None else box
        key = (n, box)
        if key not in self._memo:
            try:
                lo, hi = self._rule(n, val, box)
            except (TypeError, ValueError, IndexError, KeyError):   # an argument form no rule reads: no claim
                lo, hi = _dtype_bounds(val.dtype)
            dlo, dhi = _dtype_bounds(val.dtype)
            self._memo[key] = (max(lo, dlo), min(hi, dhi))
        return self._memo[key]

    def _operand_box(self, x, out_shape, box: Box) -> Box | None:
        """The part of a broadcast operand that `box` of the output reads."""
        xv = _val(x)
        if not isinstance(xv, torch.Tensor):
            return None
        off = len(out_shape) - xv.dim()
        return tuple((0, 1) if _size(s) == 1 else box[off + i] for i, s in enumerate(xv.shape))

    def _arg(self, x, out_shape, box: Box):
        return self.bounds(x, self._operand_box(x, out_shape, box)) if isinstance(x, torch.fx.Node) else self.bounds(x)

    def _rule(self, n: torch.fx.Node, val: torch.Tensor, box: Box) -> tuple[float, float]:
        t, a = n.target, n.args
        if n.op == "get_attr":
            part = getattr(self.gm, n.target)
            for d, (s, e) in enumerate(box):
                part = part.narrow(d, s, (part.shape[d] if e is None else e) - s)
            return (float(part.min()), float(part.max())) if part.numel() else (INF, -INF)
        if n.op != "call_function":
            return _dtype_bounds(val.dtype)
        if t in _CONST:
            return (float(_CONST[t]),) * 2
        if t in _FULL:
            v = self.bounds(a[_FULL[t]])
            return v
        if t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
            start, end, step = (0, a[0], 1) if t is aten.arange.default else (a[0], a[1], a[2] if len(a) > 2 else 1)
            start, step = float(self.bounds(start)[0]), float(self.bounds(step)[0])
            s, e = box[0]
            e = e if e is not None else _size(val.shape[0])
            if e is None or not math.isfinite(start) or not math.isfinite(step) or e <= s:
                return _dtype_bounds(val.dtype)
            ends = (start + step * s, start + step * (e - 1))
            return min(ends), max(ends)
        if t is aten.unsqueeze.default:
            d = a[1] % val.dim()
            return self.bounds(a[0], box[:d] + box[d + 1:])
        if t is aten.squeeze.dim:
            xv = _val(a[0])
            d = a[1] % xv.dim()
            return self.bounds(a[0], box[:d] + ((0, 1),) + box[d:] if _size(xv.shape[d]) == 1 else None)
        if t is aten.expand.default:
            return self.bounds(a[0], self._operand_box(a[0], val.shape, box))
        if t is aten.permute.default:
            dims = [d % val.dim() for d in a[1]]
            inner = [None] * val.dim()
            for i, d in enumerate(dims):
                inner[d] = box[i]
            return self.bounds(a[0], tuple(inner))
        if t is aten.transpose.int:
            d0, d1 = a[1] % val.dim(), a[2] % val.dim()
            inner = list(box)
            inner[d0], inner[d1] = box[d1], box[d0]
            return self.bounds(a[0], tuple(inner))
        if t is aten.slice.Tensor:
            return self._slice(n, val, box)
        if t is aten.select.int:
            xv = _val(a[0])
            d, i = a[1] % xv.dim(), a[2]
            size = _size(xv.shape[d])
            if not isinstance(i, int) or (i < 0 and size is None):
                return self.bounds(a[0])
            i = i % size if size is not None else i
            return self.bounds(a[0], box[:d] + ((i, i + 1),) + box[d:])
        if t in _CASTS:
            lo, hi = self.bounds(a[0], box)
            if val.dtype == torch.bool:
                return _truth(lo > 0 or hi < 0, lo == hi == 0)
            if not val.dtype.is_floating_point:
                return (math.trunc(lo) if math.isfinite(lo) else lo, math.trunc(hi) if math.isfinite(hi) else hi)
            return lo, hi
        if t in _MOVES:
            return self.bounds(a[0])
        if t in _CMP:
            return self._compare(_CMP[t], self._arg(a[0], val.shape, box), self._arg(a[1], val.shape, box))
        if t in _AND:
            x, y = self._arg(a[0], val.shape, box), self._arg(a[1], val.shape, box)
            return _truth(x[0] >= 1 and y[0] >= 1, x[1] <= 0 or y[1] <= 0)
        if t in _OR:
            x, y = self._arg(a[0], val.shape, box), self._arg(a[1], val.shape, box)
            return _truth(x[0] >= 1 or y[0] >= 1, x[1] <= 0 and y[1] <= 0)
        if t in _NOT:
            lo, hi = self.bounds(a[0], box)
            return _truth(hi <= 0, lo >= 1)
        if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            x, c, fill = self.bounds(a[0], box), self._arg(a[1], val.shape, box), self._arg(a[2], val.shape, box)
            return x if c[1] <= 0 else (fill if c[0] >= 1 else _hull(x, fill))
        if t in (aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar):
            c, x, y = (self._arg(z, val.shape, box) for z in a[:3])
            return x if c[0] >= 1 else (y if c[1] <= 0 else _hull(x, y))
        if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor):
            x, y = self._arg(a[0], val.shape, box), self._arg(a[1], val.shape, box)
            alpha = float(n.kwargs.get("alpha", 1))
            y = (min(alpha * y[0], alpha * y[1]), max(alpha * y[0], alpha * y[1]))
            if t in (aten.rsub.Scalar, aten.rsub.Tensor):
                x, y = y, x
                return _interval(x[0] - y[1], x[1] - y[0])
            if t in (aten.sub.Tensor, aten.sub.Scalar):
                return _interval(x[0] - y[1], x[1] - y[0])
            return _interval(x[0] + y[0], x[1] + y[1])
        if t in (aten.mul.Tensor, aten.mul.Scalar):
            x, y = self._arg(a[0], val.shape, box), self._arg(a[1], val.shape, box)
            prods = [p * q for p in x for q in y]
            return (-INF, INF) if any(math.isnan(p) for p in prods) else (min(prods), max(prods))
        if t is aten.neg.default:
            lo, hi = self.bounds(a[0], box)
            return -hi, -lo
        if t in (aten.sum.dim_IntList, aten.sum.default):
            return self._sum(n, val, box)
        if t is aten.cat.default:
            return self._cat(n, val, box)
        return _dtype_bounds(val.dtype)

    def _slice(self, n, val, box):
        x, d = n.args[0], n.args[1] % val.dim()
        start, end, step = (list(n.args[2:]) + [None, None, 1])[:3]
        size = _size(_val(x).shape[d])
        start = 0 if start is None else start
        if not isinstance(start, int) or not isinstance(step, int) or (start < 0 and size is None):
            return self.bounds(x)
        start = start + size if start < 0 else start
        s, e = box[d]
        inner_end = None if e is None else start + step * (e - 1) + 1
        return self.bounds(x, box[:d] + ((start + step * s, inner_end),) + box[d + 1:]) if step == 1 \
            else self.bounds(x)

    def _sum(self, n, val, box):
        x = n.args[0]
        xv = _val(x)
        dims = [d % xv.dim() for d in (n.args[1] if len(n.args) > 1 and n.args[1] else range(xv.dim()))]
        keep = len(n.args) > 2 and n.args[2]
        inner, j = [], 0
        for d in range(xv.dim()):
            if d in dims:
                inner.append((0, _size(xv.shape[d])))
                j += 1 if keep else 0
            else:
                inner.append(box[j])
                j += 1
        lo, hi = self.bounds(x, tuple(inner))
        sizes = [_size(xv.shape[d]) for d in dims]
        if None not in sizes:
            count = math.prod(sizes)
            return _interval(count * lo if lo else 0.0, count * hi if hi else 0.0)
        return (0.0 if lo >= 0 else -INF, 0.0 if hi <= 0 else INF)

    def _cat(self, n, val, box):
        parts, d = n.args[0], (n.args[1] if len(n.args) > 1 else 0) % val.dim()
        s, e = box[d]
        out, offset = [], 0
        for p in parts:
            size = _size(_val(p).shape[d])
            stop = None if size is None else offset + size
            lo_i, hi_i = max(s, offset), (e if stop is None else (stop if e is None else min(e, stop)))
            if hi_i is None or lo_i < hi_i:
                inner = box[:d] + ((lo_i - offset, None if hi_i is None else hi_i - offset),) + box[d + 1:]
                out.append(self.bounds(p, inner))
            if stop is None:
                break
            offset = stop
        return _hull(*out) if out else (-INF, INF)

    @staticmethod
    def _compare(op: str, x, y):
        certain = {"ge": (x[0] >= y[1], x[1] < y[0]), "gt": (x[0] > y[1], x[1] <= y[0]),
                   "le": (x[1] <= y[0], x[0] > y[1]), "lt": (x[1] < y[0], x[0] >= y[1]),
                   "eq": (x[0] == x[1] == y[0] == y[1], x[1] < y[0] or y[1] < x[0]),
                   "ne": (x[1] < y[0] or y[1] < x[0], x[0] == x[1] == y[0] == y[1])}[op]
        return _truth(*certain)


def _interval(lo, hi):
    return (-INF, INF) if math.isnan(lo) or math.isnan(hi) else (lo, hi)


def video_part_kept(gm: torch.fx.GraphModule, mask: torch.fx.Node, start: int, stop: int) -> str | None:
    """None when `mask` (broadcastable to (B, H, Nq, Nk)) is provably all-true (boolean) or all
    zero (additive) over rows and keys [start, stop); else the reason it cannot be proved."""
    val = _val(mask)
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return "the attention mask has no tensor metadata to read"
    box = list(_full_box(mask))
    for d in (-2, -1):
        if _size(val.shape[d]) != 1:
            box[d] = (start, stop)
    lo, hi = MaskBounds(gm).bounds(mask, tuple(box))
    if val.dtype == torch.bool:
        ok = lo >= 1
    else:
        ok = lo == hi == 0
    if ok:
        return None
    kind = "all-true" if val.dtype == torch.bool else "zero"
    why = (f"the attention mask {mask.name!r} cannot be proved {kind} over video x video tokens [{start}, {stop}) "
           f"from the graph (bounds [{lo:g}, {hi:g}]); a split joint site needs it")
    raw = raw_number_inputs(mask)
    if raw:
        names = ", ".join(repr(r) for r in raw)
        return (f"{why}: it is computed from the non-boolean input(s) {names}, whose values the graph cannot bound "
                "(a tokenizer's 0/1 int64 mask could hold any integer); pass it as mask.bool(), or convert it in the "
                "model (mask.bool(), mask > 0), which the proof follows")
    return f"{why} (e.g. a key-padding mask over the text built from a boolean text mask)"


_TO_BOOL = {*_CMP, *_NOT}


def raw_number_inputs(mask: torch.fx.Node) -> list[str]:
    """Names of the graph inputs (placeholders) of a non-boolean dtype that reach `mask` used as
    numbers, not converted to boolean right away (a comparison, a logical not, a cast to bool):
    their values are unknown, so no bound follows from arithmetic on them (e.g. a sum)."""
    seen, stack, raw = set(), [mask], set()
    while stack:
        n = stack.pop()
        if n in seen or n.op == "placeholder":
            continue
        seen.add(n)
        converts = n.op == "call_function" and (n.target in _TO_BOOL or (
            n.target in _CASTS and getattr(_val(n), "dtype", None) == torch.bool))
        for x in n.all_input_nodes:
            v = _val(x)
            if x.op == "placeholder":
                if isinstance(v, torch.Tensor) and v.dtype != torch.bool and not converts:
                    raw.add(x.name)
            else:
                stack.append(x)
    return sorted(raw)
