"""inline_dynamic_masks: a dynamic mask computed afresh at every call is written into the graph
Inductor compiles as the torch calls it is made of.

vsopt::dynamic_block_mask is a torch.library custom op (one node per dynamic launch group, which
exports and the plugins map, and which keeps the state of masks reused across steps), opaque to
Inductor: in a compiled graph each call runs in Python through the dispatcher, about twenty eager
ATen calls and two Triton launches, 1.1 ms of host time per call under the profiler on the H200
(2026-12-03, reference model at 16384 tokens, top-k 0.2 on every self-attention head, the bench's
8-step sampler compiled without CUDA graphs). The host set the pace: `vsopt bench --methods topk
--densities 0.2 --clip 16,64,64 --steps 8 --timing compiled` measured 81.3 ms against 47.8 dense
(0.59x) with the op, and 41.1 ms against 42.1 (1.03x) with this pass (docs/BENCH.md, session 12).
A mask that nothing reuses (reuse_steps 0) is a pure function of q and k: dynamic.predicted_block_mask, the op's own
body, which calls the pooling triton_op (Inductor launches its kernel directly) and plain ATen
ops (fused by Inductor). That function replaces the op; the values are the op's, up to
Inductor's float32 rounding of the score softmax (a top-k tie may then fall the other way).

Reused masks (reuse_steps > 0) keep the op: their state lives at run time, outside the graph.
Not in DEFAULT_PIPELINE (an exported program keeps the op); the backend runs it right before
Inductor (vsopt.inductor.prepare).
"""
from __future__ import annotations

import torch
import torch.fx

from vsopt.core.dynamic import predicted_block_mask

from .graph_edit import emit, replace_node
from .infra import GraphChanges, PassContext, PassReport, finish

NAME = "inline_dynamic_masks"
vsopt = torch.ops.vsopt
_REUSE_ARG = 7   # q, k, scale, block_m, block_n, method, value, reuse_steps, cache_key


def run(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassReport:
    report = PassReport(NAME)
    changes = GraphChanges(gm.graph)
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not vsopt.dynamic_block_mask.default \
                or node.args[_REUSE_ARG] != 0:
            continue
        with gm.graph.inserting_before(node):
            new = emit(gm.graph, predicted_block_mask, tuple(node.args[:_REUSE_ARG]), pass_name=NAME,
                       replaces=(node.name,), meta_from=node)
        replace_node(gm.graph, node, new)
        done += 1
    return finish(gm, changes, report, done, f"{done} dynamic mask(s) computed afresh written as torch calls")
