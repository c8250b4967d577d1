"""Pass: replace every detected attention (ctx.matches) with
torch.ops.vsopt.attention.default(q, k, v, mask, scale, is_causal) in (B, H, N, D) layout.

Each match is rewritten by the rule that found it (match.rule.rewrite(graph, match)), at the
match's output; if the replacement's memory layout differs from the output's, a copy into that
layout follows (graph_edit.with_layout_of). The new attention node carries meta["vsopt_site"] =
site_id and every created node meta["vsopt_from"] = ("rewrite_attention", replaced node names).
The replaced nodes become dead and are erased. With config.rewrite False (inspect), the graph is
left unchanged.

    before:  ... -> _softmax -> ... -> bmm -> _unsafe_view
    after:   q4, k4, v4 (reshape/permute of q, k, v) -> vsopt.attention -> reshape -> _unsafe_view
"""
from __future__ import annotations

import torch
import torch.fx

from .graph_edit import with_layout_of
from .infra import GraphChanges, PassContext, PassReport

NAME = "rewrite_attention"


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
    report = PassReport(NAME)
    if not ctx.config.rewrite:
        report.notes.append("rewrite disabled (config.rewrite=False): graph left unchanged")
        return report
    graph = gm.graph
    changes = GraphChanges(graph)
    replacements = []
    for site_id, m in ctx.matches.items():
        existing = set(graph.nodes)
        with graph.inserting_before(m.output):
            out = with_layout_of(graph, m.rule.rewrite(graph, m), m.output, pass_name=NAME)
        for n in graph.nodes:
            if n not in existing and n.target is torch.ops.vsopt.attention.default:
                n.meta["vsopt_site"] = site_id
        replacements.append((m.output, out))
        report.notes.append(f"{site_id}: {m.output.name} -> {out.name}")
    # Uses are redirected once every site is rewritten: a later site's match may read an earlier
    # site's output directly (its q is the previous attention), and must find it in the graph.
    for old, out in replacements:
        old.replace_all_uses_with(out)
    graph.eliminate_dead_code()
    # DCE keeps ops it considers impure (e.g. SDPA, tagged nondeterministic_seeded); the
    # replaced nodes are dead by construction, so erase those explicitly.
    for m in ctx.matches.values():
        for node in list(graph.nodes):  # export's metadata asserts on replaced nodes go with them
            if node.target is torch.ops.aten._assert_tensor_metadata.default and node.args[0].name in m.nodes:
                graph.erase_node(node)
        for node in reversed(list(graph.nodes)):
            if node.name in m.nodes and not node.users:
                graph.erase_node(node)
    graph.eliminate_dead_code()
    return changes.record(report)
