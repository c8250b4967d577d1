"""inline_permutations: static token permutations become ATen gathers in the graph Inductor compiles.

vsopt.permute_tokens / unpermute_tokens are torch.library custom ops, opaque to Inductor: in a
compiled graph each call goes through the dispatcher into Python (the op's checks, an expand,
torch.gather, a copy), about 50 us of host time per call on the H200 (the cost-model
measurements' launch section), and a permuted site has four of them (q, k, v in, the output
back). With a constant order (what lower_plan emits for static orders: a get_attr buffer) they
are plain indexing, which Inductor generates as its own kernels, fused with their neighbours
(the transposes of the model's layout), with no Python op in between:

    permute_tokens(x, P)      P (1, N): x[:, :, P[0]]      P (H, N): x[:, heads, P]   (heads = arange(H)[:, None])
    unpermute_tokens(x, P)    the same gather with the inverse order (argsort of P's rows, a new constant)

Both are exact copies, value for value what the ops return (same shape, contiguous). An order
computed in the graph (clustering's per-sample (B, H, N) orders) keeps the op.

Not in DEFAULT_PIPELINE: an exported program keeps vsopt's ops (the ONNX / TensorRT plugins map
them); the backend runs this on each rewritten graph right before Inductor (vsopt.inductor.prepare).
"""
from __future__ import annotations

import torch
import torch.fx

from vsopt.core import ops as _ops  # noqa: F401  (registers torch.ops.vsopt.*)

from .graph_edit import constant, constant_value, emit, replace_node, with_layout_of
from .infra import GraphChanges, PassContext, PassReport, finish

NAME = "inline_permutations"
aten = torch.ops.aten
vsopt = torch.ops.vsopt
_TARGETS = (vsopt.permute_tokens.default, vsopt.unpermute_tokens.default)


class _Indices:
    """The index constants of one order buffer, made once per graph: the order's rows (or its
    inverse's) and, for per-head orders, the head index column."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm, self.made = gm, {}

    def get(self, perm: torch.fx.Node, value: torch.Tensor, inverse: bool) -> list:
        key = (perm, inverse)
        if key not in self.made:
            rows = torch.argsort(value, dim=-1) if inverse else value
            label = f"{perm.target}_{'inverse' if inverse else 'rows'}"
            if rows.shape[0] == 1:   # one order shared by every head
                self.made[key] = [None, None, constant(self.gm, label, rows[0].contiguous(), like=perm,
                                                       pass_name=NAME)]
            else:
                heads = torch.arange(rows.shape[0], dtype=torch.int64)[:, None]
                self.made[key] = [None, constant(self.gm, f"{perm.target}_heads", heads, like=perm, pass_name=NAME),
                                  constant(self.gm, label, rows.contiguous(), like=perm, pass_name=NAME)]
        return self.made[key]


def _select_heads(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    """The constant head indices of index_select(., 1, const), else None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.index_select.default
            and node.args[1] == 1):
        return None
    sel = constant_value(gm, node.args[2])
    return sel if sel is not None and sel.dim() == 1 and sel.dtype == torch.int64 else None


def _gather(gm, at: torch.fx.Node, x, heads: torch.Tensor, rows: torch.Tensor, label: str) -> torch.fx.Node:
    """x[:, heads[:, None], rows] (rows (len(heads) or 1, N)) replacing `at`, as one aten.index."""
    with gm.graph.inserting_before(at):
        idx = [None, constant(gm, f"_vsopt_gather_{label}_heads", heads[:, None].contiguous(), like=x, pass_name=NAME),
               constant(gm, f"_vsopt_gather_{label}_rows", rows.contiguous(), like=x, pass_name=NAME)]
        new = emit(gm.graph, aten.index.Tensor, (x, idx), pass_name=NAME, replaces=(at.name,), meta_from=at)
        new = with_layout_of(gm.graph, new, at, pass_name=NAME)
    replace_node(gm.graph, at, new)
    return new


def _fold_head_selections(gm: torch.fx.GraphModule, gathers: dict) -> int:
    """A multi-group site (semantics.launch_groups) selects each group's heads from the permuted
    q, k, v (index_select) and puts the outputs back in head order (cat, index_select) before the
    inverse permutation. Each selection of a gathered tensor becomes one gather of the group's
    heads straight from the unpermuted tensor (the whole permuted copy is not made), and the head
    reorder before an inverse permutation joins it: one gather with a per-head index."""
    folded = 0
    for g, (rows, inverse) in list(gathers.items()):
        x = g.args[0]
        if not inverse:   # index_select(x[:, heads, P], 1, sel) == x[:, sel, P[sel]]
            for user in list(g.users):
                sel = _select_heads(gm, user)
                if sel is None:
                    continue
                _gather(gm, user, x, sel, rows[sel] if rows.shape[0] > 1 else rows, f"{g.name}_{user.name}")
                folded += 1
            if not g.users:
                gm.graph.erase_node(g)
        else:   # index_select(c, 1, inv)[:, h, Pinv[h]] == c[:, inv[h], Pinv[h]]
            sel = _select_heads(gm, x)
            if sel is None or len(x.users) != 1 or (rows.shape[0] not in (1, sel.numel())):
                continue
            _gather(gm, g, x.args[0], sel, rows, g.name)
            gm.graph.erase_node(x)
            folded += 1
    return folded


def run(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassReport:
    """Replace every permute_tokens / unpermute_tokens whose order is a (H or 1, N) constant."""
    report = PassReport(NAME)
    changes = GraphChanges(gm.graph)
    indices = _Indices(gm)
    gathers: dict[torch.fx.Node, tuple[torch.Tensor, bool]] = {}   # gather -> (its rows (H or 1, N), inverse)
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _TARGETS:
            continue
        x, perm = node.args[0], node.args[1]
        value = constant_value(gm, perm)
        if value is None or value.dim() != 2 or value.dtype != torch.int64 or perm.meta.get("val") is None:
            continue   # an order computed in the graph (or per sample): the op stays
        with gm.graph.inserting_after(perm):   # right after the order: it dominates every use
            idx = indices.get(perm, value, inverse=node.target is vsopt.unpermute_tokens.default)
        inverse = node.target is vsopt.unpermute_tokens.default
        with gm.graph.inserting_before(node):
            gather = emit(gm.graph, aten.index.Tensor, (x, idx), pass_name=NAME, replaces=(node.name,), meta_from=node)
            new = with_layout_of(gm.graph, gather, node, pass_name=NAME)   # the op's output is contiguous
        if new is gather:
            gathers[gather] = (torch.argsort(value, dim=-1) if inverse else value, inverse)
        replace_node(gm.graph, node, new, gather)
        if not perm.users:
            gm.graph.erase_node(perm)
        done += 1
    folded = _fold_head_selections(gm, gathers) if done else 0
    return finish(gm, changes, report, done,
                  f"{done} token permutation(s) with a constant order inlined as ATen gathers"
                  + (f", {folded} head selection(s) folded into them" if folded else ""))
