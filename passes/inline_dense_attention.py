"""inline_dense_attention: a site left dense (vsopt.attention) becomes ATen's SDPA in the graph
Inductor compiles.

vsopt.attention is a torch.library custom op (so that detection, plans and exports have one node
per site), opaque to Inductor: in a compiled graph every dense site is a Python call through the
dispatcher (the op's checks, then F.scaled_dot_product_attention, then a layout check), about 85
us of host time per eager call on the H200 against 29 us for SDPA itself (the cost-model
measurements' launch section). Its body is SDPA, so for Inductor it is written as
aten.scaled_dot_product_attention with the same arguments: the same kernel (SDPA's backend is
chosen the same way, from the same shapes), no Python op in between. The output is copied into
the op's layout where SDPA's differs (graph_edit.with_layout_of), as the op itself does.

Only what the op computes as plain SDPA is inlined: equal query and key/value heads (GQA repeats
keys in the op), no logit soft cap, no size that comes from the data (Inductor's SDPA lowering
guards on it and fails). Not in DEFAULT_PIPELINE (an exported program keeps the op);
the backend runs it right before Inductor (vsopt.inductor.prepare).
"""
from __future__ import annotations

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from vsopt.core.ops import attention_arguments

from .graph_edit import emit, replace_node, with_layout_of
from .infra import GraphChanges, PassContext, PassReport, finish

NAME = "inline_dense_attention"
aten = torch.ops.aten
vsopt = torch.ops.vsopt


def _data_dependent(*values) -> bool:
    """Whether a size of these inputs comes from the data (an unbacked symbol, as Mochi's trimmed
    text): Inductor's SDPA lowering guards on such sizes (Eq(u0, 0)) and refuses to compile, where
    the opaque custom op needs no guard."""
    vals = [v.meta.get("val") if isinstance(v, torch.fx.Node) else v for v in values]
    return any(isinstance(v, torch.Tensor) and free_unbacked_symbols(v) for v in vals)


def run(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassReport:
    report = PassReport(NAME)
    changes = GraphChanges(gm.graph)
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not vsopt.attention.default:
            continue
        a = attention_arguments(node.args, node.kwargs)
        qv, kv = a["q"].meta.get("val"), a["k"].meta.get("val")
        if a["softcap"] or qv is None or kv is None or qv.shape[1] != kv.shape[1] \
                or not isinstance(a["scale"], (int, float)) or not isinstance(a["is_causal"], bool) \
                or _data_dependent(qv, kv, a["attn_mask"]):
            continue
        with gm.graph.inserting_before(node):
            new = emit(gm.graph, aten.scaled_dot_product_attention.default,
                       (a["q"], a["k"], a["v"], a["attn_mask"], 0.0, a["is_causal"]),
                       {"scale": float(a["scale"])}, pass_name=NAME, replaces=(node.name,), meta_from=node)
            out = with_layout_of(gm.graph, new, node, pass_name=NAME)
        replace_node(gm.graph, node, out, new)
        done += 1
    return finish(gm, changes, report, done, f"{done} dense site(s) written as ATen SDPA for Inductor")
