"""Pass: find every attention in the ATen graph (rules in passes/rules/), record an AttentionSite
per match in ctx.sites and each candidate left alone in ctx.skipped.

Every node is offered to the rules of DEFAULT_RULES in order; the first whose pattern anchors on
it runs its check. A match goes into ctx.matches (site_id -> AttentionMatch, with the rule that
found it) for infer_grid and rewrite_attention; a failed check of a real candidate is a
SkippedSite with the rule's reason. Under config.strict such a candidate raises
UnsupportedSiteError naming it and why. A node the rule finds is no attention at all (a softmax
that is not softmax(q @ k^T) @ v: rules/attention_shape.py) is no candidate: only a note says why.
The graph is not changed here.

Site ids: the module path of the anchor (passes/site_ids.py), "path:k" for the k-th further
attention of one module, "attention.<ordinal>" where no path exists.
"""
from __future__ import annotations

import logging

import torch.fx

from vsopt.core.errors import UnsupportedSiteError
from vsopt.core.ir import AttentionSite, GridSource, SkippedSite

from .infra import PassContext, PassReport
from .rules import DEFAULT_RULES
from .site_ids import layer_index, module_path, relative_note

NAME = "detect_attention"
log = logging.getLogger("vsopt")


def _unique(base: str, taken: dict[str, int]) -> str:
    """base, or base:k for the k-th further attention in the same module."""
    k = taken.get(base, 0)
    taken[base] = k + 1
    return base if k == 0 else f"{base}:{k}"


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
    report = PassReport(NAME)
    taken: dict[str, int] = {}
    ordinal = 0
    for node in list(gm.graph.nodes):
        for rule in DEFAULT_RULES:
            if not rule.pattern(node):
                continue
            result = rule.check(node)
            path = module_path(node)
            relative = relative_note(node) if result.ok or result.candidate else None
            if relative:  # never guessed: the id stays relative, and says so
                report.notes.append(relative)
                log.log(logging.WARNING if ctx.config.plan is not None else logging.INFO, "vsopt: %s", relative)
            if result.ok:
                site_id = _unique(path or f"attention.{ordinal}", taken)
                ordinal += 1
                m = result.match
                ctx.sites.append(AttentionSite(
                    site_id=site_id, layer=layer_index(site_id) if path else None, rule=m.rule_name,
                    layout=m.layout, batch=m.batch, heads=m.heads, kv_heads=m.kv_heads, head_dim=m.head_dim,
                    value_dim=m.value_dim, q_len=m.q_len, kv_len=m.kv_len, dtype=m.dtype, scale=m.scale,
                    has_mask=m.has_mask, is_causal=m.is_causal, grid=None, grid_source=GridSource.UNKNOWN,
                    output_node=m.output.name, nodes=m.nodes, softcap=m.softcap))
                ctx.matches[site_id] = m
                report.notes.append(f"{site_id}: {m.rule_name} at {node.name}")
            elif result.candidate:
                site_id = path or f"attention.{ordinal}"
                ctx.skipped.append(SkippedSite(site_id=site_id, node=node.name, reason=result.reason, rule=rule.name))
                report.notes.append(f"{site_id}: left alone at {node.name}: {result.reason}")
                if ctx.config.strict:
                    raise UnsupportedSiteError(site_id, f"{result.reason} (node {node.name}, rule {rule.name})")
            else:  # never an attention (e.g. a classifier's softmax): no candidate, but said why
                report.notes.append(f"{node.name}: not an attention ({rule.name}): {result.reason}")
            break
    return report
