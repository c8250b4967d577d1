"""static_work_orders: a block-sparse launch over a constant table gets its work order as a constant.

The kernel runs a table's rows in a work order (kernels/block_sparse/schedule.work_order: each
head's rows longest first), computed from kv_counts and the batch. Traced into a compiled graph,
that is a sort and a few index ops at every call (about seven ATen ops, two or three Inductor
kernels per launch) for a table that never changes: lower_plan's static tables are get_attr
constants. This pass computes the order once, from the constant, and passes it as the launch's
row_order (vsopt.core.ops.row_order, the same function the launcher calls), a constant of the
graph. The order schedules rows only, the output does not depend on it.

Not in DEFAULT_PIPELINE: an exported program keeps the op's plain form (the plugins map it); the
backend runs this on each rewritten graph right before Inductor (vsopt.inductor.prepare). A
launch whose table is computed in the graph (dynamic masks), or whose batch is symbolic, keeps
computing its order.
"""
from __future__ import annotations

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from vsopt.core.ops import row_order

from .graph_edit import constant, constant_value
from .infra import GraphChanges, PassContext, PassReport, finish

NAME = "static_work_orders"
vsopt = torch.ops.vsopt
_LAUNCHES = (vsopt.block_sparse_attention.default, vsopt.block_sparse_attention_lse.default)
_COUNTS_ARG = 4   # q, k, v, kv_indices, kv_counts, ...


def run(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassReport:
    report = PassReport(NAME)
    changes = GraphChanges(gm.graph)
    made: dict[tuple[torch.fx.Node, int], torch.fx.Node] = {}
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LAUNCHES or "row_order" in node.kwargs \
                or len(node.args) > 10:
            continue
        counts_node = node.args[_COUNTS_ARG]
        counts = constant_value(gm, counts_node)
        q = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        if counts is None or counts_node.meta.get("val") is None or q is None or not is_concrete_int(q.shape[0]):
            continue
        batch = int(q.shape[0])
        key = (counts_node, batch)
        if key not in made:
            with gm.graph.inserting_after(counts_node):
                made[key] = constant(gm, f"{counts_node.target}_order", row_order(counts, batch), like=counts_node,
                                     pass_name=NAME)
        node.kwargs = {**node.kwargs, "row_order": made[key]}
        done += 1
    return finish(gm, changes, report, done,
                  f"{done} launch(es) over a constant table given their work order as a constant")
