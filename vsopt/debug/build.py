"""Building a DiffReport: from the graphs before and after the passes and what the pipeline found
(build_report), or from a model end to end (diff, what `vsopt.diff(...)` runs).

diff traces the model once (vsopt.backend.to_aten) and runs the passes on a copy of that graph
(trace_and_rewrite hands an ATen graph to its pipeline as it is), so the graph before the passes
is the very graph the passes started from: node names agree by construction, and which nodes the
passes created or removed is what their PassReports say (PipelineReport.passes).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx
from torch.utils._pytree import tree_leaves

from vsopt.core.errors import ConfigError, VsoptError
from vsopt.core.ir import AttentionSite, SkippedSite
from vsopt.debug.graph import ChangeRegion, PassChanges, SourceLocation, diff_graphs, source_location
from vsopt.debug.numeric import DEFAULT_THRESHOLD, SiteProbe, measure, measure_trajectory
from vsopt.debug.report import DiffReport, SiteEntry, plan_heads


def _probe(site: AttentionSite, region: ChangeRegion, after: torch.fx.Graph) -> SiteProbe:
    """Where a rewritten site's output lives in the after graph: the created node whose value
    leaves the region (the one node a kept node reads)."""
    inside = {n.name for n in region.after.nodes}
    exits = [n.name for n in after.nodes if n.name in inside and any(u.name not in inside for u in n.users)]
    if len(exits) != 1:
        raise VsoptError(f"site {site.site_id!r}: cannot tell which rewritten node holds its output "
                         f"(candidates: {exits or 'none'})")
    return SiteProbe(site.site_id, site.output_node, exits[0], site.heads, site.q_len, site.layout)


def build_report(before: torch.fx.GraphModule, after: torch.fx.GraphModule, sites: Sequence[AttentionSite],
                 skipped: Sequence[SkippedSite], *, plan: Any = None, inputs: Sequence[Any] | None = None,
                 threshold: float = DEFAULT_THRESHOLD, sampler: Callable | None = None,
                 model_name: str = "model", pass_order: Sequence[str] = (),
                 passes: Sequence[Any] | None = None) -> DiffReport:
    """The report from the graphs before and after the passes and what the pipeline found.

    inputs: the graphs' flat inputs for the numerical view (None: structural view only).
    sampler: see vsopt.debug.numeric.measure_trajectory (the view over sampling steps).
    pass_order: the names of the passes in the order they ran.
    passes: the pipeline's PassReports (PipelineReport.passes): what each pass created and removed,
        and their order; None for a rewrite without reports (then node provenance tells)."""
    if passes is not None:
        pass_order = pass_order or [p.name for p in passes]
    site_nodes = {s.site_id: (*s.nodes, s.output_node) for s in sites}
    anchors = {**{s.site_id: s.node for s in skipped}, **{s.site_id: s.output_node for s in sites}}
    structure = diff_graphs(before.graph, after.graph, site_nodes, anchors, pass_order,
                            PassChanges.of(passes) if passes is not None else None)
    before_nodes = {n.name: n for n in before.graph.nodes}
    order = {name: i for i, name in enumerate(before_nodes)}
    skipped = list(skipped)

    entries = []
    for site in sites:
        region = structure.region_for(site.site_id)
        # A later pass may decline part of a detected site (no plan entry, a plan that does not fit):
        # same id, anchored on one of the site's nodes or on a node the passes made. A skip with the
        # same id on another node of the original graph is a different candidate.
        skip = next((k for k in skipped if k.site_id == site.site_id
                     and (k.node == site.output_node or k.node in site.nodes or k.node not in before_nodes)),
                    None)
        if skip is not None:
            skipped.remove(skip)
        status = "rewritten" if region is not None else ("left alone" if skip else "unchanged")
        reason = skip.reason if skip else (None if region else "detected, but the passes changed no node of it")
        anchor = site.output_node
        entries.append(SiteEntry(site.site_id, status, site.rule or (skip.rule if skip else ""), reason, anchor,
                                 _location(before_nodes, anchor), site, region,
                                 plan_heads(plan, site.site_id) if region else []))
    taken = {e.site_id for e in entries}
    for skip in skipped:  # candidates that never became sites
        label = skip.site_id if skip.site_id not in taken else f"{skip.site_id}@{skip.node}"
        taken.add(label)
        entries.append(SiteEntry(label, "left alone", skip.rule, skip.reason, skip.node,
                                 _location(before_nodes, skip.node), None, None))
    entries.sort(key=lambda e: order.get(e.node, len(order)))

    numerical, steps = None, []
    if inputs is not None or sampler is not None:
        probes = [_probe(e.site, e.region, after.graph) for e in entries if e.status == "rewritten"]
        if inputs is not None:
            numerical, _ = measure(before, after, probes, inputs, threshold)
        if sampler is not None:
            steps = measure_trajectory(before, after, probes, sampler, threshold)
    return DiffReport(model_name, entries, structure, numerical, steps)


def _location(nodes: Mapping[str, torch.fx.Node], name: str) -> SourceLocation | None:
    node = nodes.get(name)
    return source_location(node) if node is not None else None


def diff(model: torch.nn.Module, example_inputs: Sequence[Any], plan: Any = None,
         options: Mapping[str, Any] | None = None, *, threshold: float = DEFAULT_THRESHOLD,
         numerics: bool = True, sampler: Callable | None = None) -> DiffReport:
    """Trace `model` on `example_inputs`, run vsopt's passes with `plan` (a Plan, a plan path, or
    None for dense), and report both views.

    options: the other backend options (VsoptConfig), e.g. {"grid": (4, 8, 8)}.
    threshold: relative L2 of a site's output above which it is flagged.
    numerics: False skips the numerical view (no model runs).
    sampler: a function that runs a sampling loop with the given denoiser (see
        vsopt.debug.numeric.measure_trajectory); it is called with the traced graphs, which take
        the flat inputs."""
    from vsopt.backend import to_aten, trace_and_rewrite
    from vsopt.core.config import VsoptConfig

    options = dict(options or {})
    if plan is not None and options.get("plan") is not None:
        raise ConfigError("give the plan either as `plan=` or in options, not both")
    if plan is not None:
        options["plan"] = plan
    config = VsoptConfig.from_options(options)
    example_inputs = tuple(example_inputs)
    before = to_aten(model, example_inputs)
    # the passes edit in place: they get a copy of the graph (the module's weights are shared)
    after, pipeline = trace_and_rewrite(torch.fx.GraphModule(before, copy.deepcopy(before.graph)), example_inputs,
                                        config)
    flat = _flat_inputs(after, example_inputs) if numerics else None
    return build_report(before, after, pipeline.sites, pipeline.skipped, plan=config.plan, inputs=flat,
                        threshold=threshold, sampler=sampler, model_name=type(model).__name__,
                        passes=pipeline.passes)


def _flat_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    flat = tree_leaves(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat):
        raise VsoptError(f"the traced graph takes {len(placeholders)} inputs but the example inputs flatten to "
                         f"{len(flat)}")
    return flat
