"""The two operands of a matmul-like node (matmul, bmm, baddbmm, einsum) seen as atoms (see
passes/layout_trace.py): which atoms are the batch, which the rows (tokens) and which the
contraction (features). A helper of SoftmaxAttentionRule, for both of its matmuls:

    scores = q @ k^T:   A = q (rows: query tokens),  B = k^T (columns: key tokens)
    out    = p @ v:     A = p (rows: query tokens),  B = v   (the caller swaps token / feature)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from ..layout_trace import Atom, TraceError, Traced, einsum_terms, trace_back
from .match import normalize_args

aten = torch.ops.aten

OutSpec = list[tuple[str, int]]  # per output axis: ("a" or "b", the operand axis it comes from)


@dataclass
class Operand:
    """A matmul operand seen as atoms: batch atoms (flattened over the batch axes), the row/token
    atoms and the contraction atoms."""

    traced: Traced
    axes: list[list[Atom]]  # the operand's axes as the matmul sees them (broadcast batch axes padded)
    batch: list[Atom]
    token: list[Atom]
    feature: list[Atom]


def einsum_spec(eq: str) -> tuple[list[str], str] | None:
    """'bhnd,bhmd->bhnm' -> (['bhnd', 'bhmd'], 'bhnm'); None unless two explicit operands."""
    terms = einsum_terms(eq)
    return terms if terms is not None and len(terms[0]) == 2 else None


def operands(score: torch.fx.Node) -> tuple[Operand, Operand, OutSpec, str, Any] | str:
    """For a matmul-like node A x B: (A as Operand with token = rows, B with token = columns,
    where each output axis comes from, the kind of matmul, extra: baddbmm's (bias, beta, alpha)).
    A string is a failure reason."""
    t = score.target
    a_node, b_node = (score.args[1], score.args[2]) if t is aten.baddbmm.default else (score.args[0], score.args[1])
    if t is aten.einsum.default:
        spec = einsum_spec(score.args[0])
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
        oa = Operand(ta, ta.axes, [x for ch in batch for x in ax_a[ch]], ax_a[r], ax_a[c])
        ob = Operand(tb, tb.axes, [x for ch in batch for x in ax_b[ch]], ax_b[k], ax_b[c])
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
    oa = Operand(ta, pad_a + ta.axes[-2:], [x for ax in pad_a for x in ax], ta.axes[-2], ta.axes[-1])
    ob = Operand(tb, pad_b + tb.axes[-2:], [x for ax in pad_b for x in ax], tb.axes[-1], tb.axes[-2])
    extra = None
    if t is aten.baddbmm.default:
        a = normalize_args(score)
        extra = (a["self"], float(a["beta"]), float(a["alpha"]))
    spec_out = [("a", i) for i in range(nb + 1)] + [("b", nb + 1)]
    return oa, ob, spec_out, t.__name__.split(".")[0], extra


def group_sizes(atoms: list[Atom], sizes: list[int]) -> list[list[Atom]] | None:
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
