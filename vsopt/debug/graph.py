"""The structural view of `vsopt diff`: what the passes changed in the graph, aligned by provenance.

Input: the ATen graph before the passes and the graph after them (torch.fx), plus the sites the
pipeline found and, from a pipeline run, what each pass reported changing (PassChanges). A node
is *kept* when a node of the same name and target exists in both graphs and no pass reported
creating or removing it (without reports: no pass marked it as created, node.meta["vsopt_from"]).
Every other node was *removed* (before only) or *created* (after only). Removed and created nodes are joined into change
regions with networkx: data edges among removed nodes, data edges among created nodes, and
provenance edges from each created node to the nodes it replaced; each connected component is
one region, normally one attention site. Kept nodes between regions collapse into counts.

    before:  ... linear -> reshape -> matmul -> mul -> softmax -> matmul_1 -> transpose ...
    after:   ... linear -> reshape -> vsopt.attention -----------------------> transpose ...
    regions: [{site_ids: [blocks.0], removed: matmul, mul, softmax, matmul_1;  created: attention}]
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import networkx as nx
import torch.fx

# Node kinds that are computation (counted and drawn); placeholders, get_attr and output are not.
_COMPUTE_OPS = ("call_function", "call_method", "call_module")
_FRAME_RE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\n(?P<code>[^\n]*)')
_TORCH_DIR = os.path.dirname(os.path.dirname(torch.fx.__file__))  # .../site-packages/torch


@dataclass(frozen=True)
class SourceLocation:
    """Where a node came from in the model's source: the innermost frame outside torch itself."""

    file: str
    line: int
    code: str

    def short(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "code": self.code}


def source_location(node: torch.fx.Node) -> SourceLocation | None:
    """The user frame of node.meta["stack_trace"] (None when the node has no trace)."""
    frames = list(_FRAME_RE.finditer(node.meta.get("stack_trace") or ""))
    if not frames:
        return None
    user = [f for f in frames if not os.path.abspath(f["file"]).startswith(_TORCH_DIR + os.sep)]
    f = (user or frames)[-1]
    return SourceLocation(f["file"], int(f["line"]), f["code"].strip())


def op_label(node: torch.fx.Node) -> str:
    """A short readable name of what a node computes: "matmul", "vsopt.attention", "getitem"."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            ns, op = target.namespace, target.__name__.split(".")[0]
            return op if ns == "aten" else f"{ns}.{op}"
        return getattr(target, "__name__", str(target))  # operator.getitem and other Python callables
    if node.op in ("call_method", "call_module", "get_attr"):
        return str(node.target)
    return node.op


def _shape(node: torch.fx.Node) -> str:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    return "x".join(str(int(s)) if str(s).isdigit() else str(s) for s in shape) if shape is not None else ""


@dataclass(frozen=True)
class OpNode:
    """One node as the report shows it."""

    name: str
    op: str  # op_label()
    shape: str  # e.g. "1x2x8x8"; "" when unknown
    source: SourceLocation | None

    @classmethod
    def of(cls, node: torch.fx.Node) -> "OpNode":
        return cls(node.name, op_label(node), _shape(node), source_location(node))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "shape": self.shape,
                "source": self.source.to_dict() if self.source else None}


@dataclass
class Subgraph:
    """A region's nodes in one graph plus its boundary (kept neighbours, drawn as context)."""

    nodes: list[OpNode]  # the changed nodes, in graph order
    boundary: list[OpNode]  # kept nodes feeding or consuming them, in graph order
    edges: list[tuple[str, str]]  # data edges among nodes and boundary (producer, consumer)

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": [n.to_dict() for n in self.nodes], "boundary": [n.to_dict() for n in self.boundary],
                "edges": [list(e) for e in self.edges]}


@dataclass
class ChangeRegion:
    """One connected change: what the before graph had and what replaced it."""

    site_ids: list[str]  # the attention sites it belongs to (normally one; [] outside any site)
    passes: list[str]  # names of the passes that created its nodes, in pipeline order
    before: Subgraph
    after: Subgraph

    def to_dict(self) -> dict[str, Any]:
        return {"site_ids": self.site_ids, "passes": self.passes, "before": self.before.to_dict(),
                "after": self.after.to_dict()}


@dataclass
class StructuralDiff:
    """The aligned graphs. `timeline` is the before graph in execution order with runs of kept
    nodes collapsed: ("unchanged", n) for n kept compute nodes, ("region", i) for regions[i],
    ("anchor", label) for the anchors given to diff_graphs."""

    kept: list[str]  # compute nodes present, unchanged, in both graphs (before order)
    removed: list[str]  # nodes only in the before graph (before order)
    created: list[str]  # nodes only in the after graph (after order)
    regions: list[ChangeRegion]  # in execution order
    timeline: list[tuple[str, int | str]] = field(default_factory=list)

    def region_for(self, site_id: str) -> ChangeRegion | None:
        return next((r for r in self.regions if site_id in r.site_ids), None)

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "removed": self.removed, "created": self.created,
                "regions": [r.to_dict() for r in self.regions], "timeline": [list(t) for t in self.timeline]}


def _provenance(node: torch.fx.Node) -> tuple[str, tuple[str, ...]] | None:
    """node.meta["vsopt_from"] as (pass name, replaced node names), or None."""
    origin = node.meta.get("vsopt_from")
    if origin is None:
        return None
    pass_name, replaced = origin
    return str(pass_name), tuple(str(r) for r in (replaced or ()))


@dataclass(frozen=True)
class PassChanges:
    """The node names the passes of one pipeline run reported creating and removing (each
    passes.infra.PassReport's created / removed lists, taken together)."""

    created: frozenset[str]
    removed: frozenset[str]

    @classmethod
    def of(cls, reports: Iterable[Any]) -> "PassChanges":
        reports = list(reports)
        return cls(frozenset(n for r in reports for n in r.created), frozenset(n for r in reports for n in r.removed))


def _is_kept(node: torch.fx.Node, before_nodes: dict[str, torch.fx.Node], changes: PassChanges | None) -> bool:
    old = before_nodes.get(node.name)
    if old is None or old.op != node.op or op_label(old) != op_label(node):
        return False
    if changes is not None:  # the passes' own reports say what they touched
        return node.name not in changes.created and node.name not in changes.removed
    return _provenance(node) is None  # two graphs only: a node a pass made carries its provenance


def to_networkx(graph: torch.fx.Graph) -> nx.DiGraph:
    """The data-flow graph of an FX graph: one vertex per node name, an edge producer -> consumer."""
    g = nx.DiGraph()
    for order, node in enumerate(graph.nodes):
        g.add_node(node.name, order=order)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def _live(g: nx.DiGraph, graph: torch.fx.Graph) -> set[str]:
    """Names of the nodes the output depends on, plus every placeholder (inputs stay inputs)."""
    live = {n.name for n in graph.nodes if n.op in ("placeholder", "output")}
    for n in graph.nodes:
        if n.op == "output":
            live |= nx.ancestors(g, n.name)
    return live


def _subgraph(changed: Iterable[str], nodes: dict[str, torch.fx.Node], g: nx.DiGraph, order: dict[str, int],
              drawable: set[str]) -> Subgraph:
    changed = sorted(set(changed), key=order.__getitem__)
    inside = set(changed)
    boundary = {nb for n in changed for nb in (*g.predecessors(n), *g.successors(n))
                if nb not in inside and nb in drawable}
    shown = inside | boundary
    edges = sorted(((u, v) for u, v in g.subgraph(shown).edges if u in inside or v in inside),
                   key=lambda e: (order[e[0]], order[e[1]]))
    return Subgraph([OpNode.of(nodes[n]) for n in changed],
                    [OpNode.of(nodes[n]) for n in sorted(boundary, key=order.__getitem__)], edges)


def diff_graphs(before: torch.fx.Graph, after: torch.fx.Graph, site_nodes: Mapping[str, Sequence[str]] | None = None,
                anchors: Mapping[str, str] | None = None, pass_order: Sequence[str] = (),
                changes: PassChanges | None = None) -> StructuralDiff:
    """Align `before` and `after` by provenance and group the changes into regions.

    site_nodes maps site_id -> names of the before-graph nodes that site matched (from the
    AttentionSites); it names regions whose created nodes carry no node.meta["vsopt_site"].
    anchors maps a label (a site) -> the before-graph node it sits on; each anchor on a kept node
    (a site left alone) appears in the timeline as ("anchor", label), splitting the unchanged run.
    pass_order: the pipeline's pass names, to list each region's passes in the order they ran.
    changes: what the passes reported changing (PassChanges.of(PipelineReport.passes)); None
    for two graphs without reports (then node.meta["vsopt_from"] tells what a pass made).
    """
    site_nodes = site_nodes or {}
    anchors = anchors or {}
    gb, ga = to_networkx(before), to_networkx(after)
    # Dead nodes (nothing that reaches the output reads them) are left out of both graphs: in the
    # after graph they are what a pass replaced but left for a later dead-code sweep.
    live_b, live_a = _live(gb, before), _live(ga, after)
    gb, ga = gb.subgraph(live_b), ga.subgraph(live_a)
    b_nodes = {n.name: n for n in before.nodes if n.name in live_b}
    a_nodes = {n.name: n for n in after.nodes if n.name in live_a}
    b_order = {name: i for i, name in enumerate(b_nodes)}
    a_order = {name: i for i, name in enumerate(a_nodes)}

    kept_names = {n for n, node in a_nodes.items() if _is_kept(node, b_nodes, changes)}
    removed = [n for n in b_nodes if n not in kept_names]
    created = [n for n in a_nodes if n not in kept_names]

    # The change graph: removed and created nodes joined by data and provenance edges.
    change = nx.Graph()
    change.add_nodes_from(("before", n) for n in removed)
    change.add_nodes_from(("after", n) for n in created)
    change.add_edges_from((("before", u), ("before", v)) for u, v in gb.subgraph(removed).edges)
    change.add_edges_from((("after", u), ("after", v)) for u, v in ga.subgraph(created).edges)
    removed_set = set(removed)
    for name in created:
        prov = _provenance(a_nodes[name])
        for old in (prov[1] if prov else ()):
            if old in removed_set:
                change.add_edge(("after", name), ("before", old))
        # Provenance through the site: a node that replaced a node some earlier pass had created
        # (lower_plan replacing vsopt.attention) names that vanished node, so the chain back to
        # the original graph is kept by the site id instead.
        for old in site_nodes.get(a_nodes[name].meta.get("vsopt_site"), ()):
            if old in removed_set:
                change.add_edge(("after", name), ("before", old))

    owner = {n: sid for sid, names in site_nodes.items() for n in names}
    drawable_b = {n for n, node in b_nodes.items() if node.op in _COMPUTE_OPS or node.op == "placeholder"}
    drawable_a = {n for n, node in a_nodes.items() if node.op in _COMPUTE_OPS or node.op == "placeholder"}
    # where a region with no removed node goes: just after the kept node before its first node
    kept_before: dict[str, str | None] = {}
    last_kept = None
    for name in a_nodes:
        kept_before[name] = last_kept
        if name in kept_names:
            last_kept = name

    regions: list[tuple[float, ChangeRegion]] = []
    for component in nx.connected_components(change):
        compute_before = [n for side, n in component if side == "before" and b_nodes[n].op in _COMPUTE_OPS]
        compute_after = [n for side, n in component if side == "after" and a_nodes[n].op in _COMPUTE_OPS]
        if not compute_before and not compute_after:
            continue  # placeholders or outputs renamed by retracing: nothing a user changed
        site_ids = sorted({a_nodes[n].meta["vsopt_site"] for side, n in component
                           if side == "after" and "vsopt_site" in a_nodes[n].meta}
                          | {owner[n] for side, n in component if side == "before" and n in owner})
        passes = sorted({p[0] for side, n in component if side == "after" and (p := _provenance(a_nodes[n]))},
                        key=lambda p: (pass_order.index(p) if p in pass_order else len(pass_order), p))
        if compute_before:  # position in execution order, in the before graph
            pos: float = min(b_order[n] for n in compute_before)
        else:
            prior = kept_before[min(compute_after, key=a_order.__getitem__)]
            pos = b_order[prior] + 0.5 if prior is not None else -0.5
        regions.append((pos, ChangeRegion(
            site_ids=site_ids, passes=passes,
            before=_subgraph(compute_before, b_nodes, gb, b_order, drawable_b),
            after=_subgraph(compute_after, a_nodes, ga, a_order, drawable_a))))
    regions.sort(key=lambda pr: pr[0])

    kept = [n for n in b_nodes if n in kept_names and b_nodes[n].op in _COMPUTE_OPS]
    return StructuralDiff(kept=kept, removed=[n for n in removed if b_nodes[n].op in _COMPUTE_OPS],
                          created=[n for n in created if a_nodes[n].op in _COMPUTE_OPS],
                          regions=[r for _, r in regions],
                          timeline=_collapse(b_nodes, set(kept), [pos for pos, _ in regions], anchors))


def _collapse(b_nodes: dict[str, torch.fx.Node], kept: set[str], region_pos: Sequence[float],
              anchors: Mapping[str, str]) -> list[tuple[str, int | str]]:
    """The timeline: walk the before graph, counting kept compute nodes between regions (at
    region_pos[i], a before-graph index, or index + 0.5 for "just after") and anchors on kept nodes."""
    region_at: dict[float, list[int]] = {}
    for i, pos in enumerate(region_pos):
        region_at.setdefault(pos, []).append(i)
    anchor_at: dict[str, list[str]] = {}
    for label, node_name in anchors.items():
        anchor_at.setdefault(node_name, []).append(label)
    timeline: list[tuple[str, int | str]] = []
    run = 0

    def flush():
        nonlocal run
        if run:
            timeline.append(("unchanged", run))
            run = 0

    timeline.extend(("region", r) for pos in sorted(p for p in region_at if p < 0) for r in region_at[pos])
    for i, name in enumerate(b_nodes):
        if i in region_at:
            flush()
            timeline.extend(("region", r) for r in region_at[i])
        if name in anchor_at and name in kept:  # an anchor on a removed node is inside a region
            flush()
            timeline.extend(("anchor", label) for label in anchor_at[name])
        if name in kept:
            run += 1
        if i + 0.5 in region_at:
            flush()
            timeline.extend(("region", r) for r in region_at[i + 0.5])
    flush()
    return timeline


def layered_layout(sub: Subgraph) -> dict[str, tuple[int, int]]:
    """(layer, row) per node of a subgraph for drawing: layers are networkx topological generations,
    rows keep the boundary first, then graph order, within a layer."""
    g = nx.DiGraph()
    names = [n.name for n in (*sub.boundary, *sub.nodes)]
    g.add_nodes_from(names)
    g.add_edges_from(sub.edges)
    rank = {n: i for i, n in enumerate(names)}
    out: dict[str, tuple[int, int]] = {}
    for layer, generation in enumerate(nx.topological_generations(g)):
        for row, n in enumerate(sorted(generation, key=rank.__getitem__)):
            out[n] = (layer, row)
    return out
