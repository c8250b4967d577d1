"""The pass infrastructure: what every pass receives, what it returns, and how a pipeline runs.

A pass is a module in passes/ named after what it does, exposing

    NAME: str
    def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport

It edits gm in place and returns a PassReport listing what it changed (never global counters):
the names of the nodes it created and removed (a pass records them with GraphChanges, so that a
pass run on its own reports the same as in a pipeline) and one-line notes. Passes read shapes only
from node.meta["val"] (they never run the model), and every node a pass creates gets
node.meta["vsopt_from"] = (pass name, names of the nodes it replaces) for provenance. Rewritten
attention nodes carry node.meta["vsopt_site"] = site_id.

What passes hand to later passes lives in typed fields of the PassContext, never in an untyped
dict: detect_attention fills `sites`, `skipped` and `matches`; infer_grid gives the sites their
grids; rewrite_attention rewrites each match with its rule; lower_plan adds to `skipped` and fills
`lowered`, `kept_dense` and `absent_plan_sites`.

run_pipeline runs the passes in order. With PipelineOptions it also, after every pass,
- writes the graph as text to dump_dir, one file per pass ("01-detect_attention.txt", ...);
- checks the graph (check_each_pass): graph.lint() (well-formed, defined before use) and
  meta["val"] present on every call_function node (the shape metadata later passes and their
  checks read). A failure is a PassError naming the pass after which the graph broke.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch.fx

from vsopt.core.config import VsoptConfig
from vsopt.core.errors import PassError, VsoptError
from vsopt.core.io import atomic_write_text
from vsopt.core.ir import AttentionSite, SkippedSite

from .rules import AttentionMatch


@dataclass
class PassReport:
    """What one pass changed."""

    name: str
    created: list[str] = field(default_factory=list)  # names of nodes added, in graph order
    removed: list[str] = field(default_factory=list)  # names of nodes erased, in their former graph order
    notes: list[str] = field(default_factory=list)  # human-readable remarks (one line each)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.removed)


class GraphChanges:
    """The nodes a pass created and removed, from the graph's nodes before and after it:

        changes = GraphChanges(gm.graph)
        ...edit gm.graph...
        changes.record(report)      # report.created / report.removed
    """

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.before = list(graph.nodes)

    def record(self, report: PassReport) -> PassReport:
        before, after = set(self.before), set(self.graph.nodes)
        report.created = [n.name for n in self.graph.nodes if n not in before]
        report.removed = [n.name for n in self.before if n not in after]
        return report


def finish(gm: torch.fx.GraphModule, changes: GraphChanges, report: PassReport, done: int, note: str) -> PassReport:
    """The end of a pass run on its own, outside run_pipeline (vsopt.inductor.prepare): when it
    made `done` > 0 edits, the graph is checked (graph.lint()) and its code regenerated (recompile),
    so that gm runs the edited graph at once, and `note` says what was done; then the nodes created
    and removed are recorded in the report."""
    if done:
        gm.graph.lint()
        gm.recompile()
        report.notes.append(note)
    return changes.record(report)


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run over one graph."""

    config: VsoptConfig
    sites: list[AttentionSite] = field(default_factory=list)  # filled by detection, in graph order
    skipped: list[SkippedSite] = field(default_factory=list)  # candidates left alone, with reasons
    ran: list[str] = field(default_factory=list)  # names of the passes run so far
    # site_id -> what a rule's check found (detect_attention); infer_grid reads its q_token_source,
    # rewrite_attention replaces it with match.rule.rewrite(graph, match)
    matches: dict[str, AttentionMatch] = field(default_factory=dict)
    lowered: list[str] = field(default_factory=list)  # sites lower_plan rewrote into block-sparse launches
    kept_dense: dict[str, str] = field(default_factory=dict)  # site_id -> why it is dense on purpose
    absent_plan_sites: list[str] = field(default_factory=list)  # plan entries for sites this graph lacks

    def site(self, site_id: str) -> AttentionSite:
        for s in self.sites:
            if s.site_id == site_id:
                return s
        raise KeyError(f"no attention site {site_id!r}; sites are {[s.site_id for s in self.sites]}")


@dataclass(frozen=True)
class PipelineOptions:
    """How run_pipeline watches its passes (both off by default: they cost a walk of the graph
    per pass, and the dump a file write)."""

    check_each_pass: bool = False  # graph.lint() and the meta["val"] check after every pass
    dump_dir: str | os.PathLike | None = None  # write the graph after every pass into this folder


@dataclass
class PipelineReport:
    """Everything a pipeline run found and changed; returned by run_pipeline. `passes` holds each
    pass's report in the order they ran (what the graph-diff debugger shows per pass)."""

    sites: list[AttentionSite]
    skipped: list[SkippedSite]
    passes: list[PassReport]
    lowered: list[str] = field(default_factory=list)
    kept_dense: dict[str, str] = field(default_factory=dict)
    absent_plan_sites: list[str] = field(default_factory=list)

    def dense_sites(self) -> list[tuple[str, str]]:
        """Every site and candidate that runs dense, with why, as (site_id, reason): first the ones
        left alone (candidates the rules could not match, sites the plan could not be applied to:
        `skipped`), then the ones dense on purpose (no plan, a dense plan entry: `kept_dense`)."""
        return [(s.site_id, s.reason) for s in self.skipped] + list(self.kept_dense.items())


def check_graph(gm: torch.fx.GraphModule) -> tuple[str, str | None] | None:
    """What is wrong with the graph, as (message, node name or None); None when it is sound:
    graph.lint() passes and every call_function node has meta["val"]."""
    try:
        gm.graph.lint()
    except (RuntimeError, ValueError) as e:  # what lint raises for a malformed graph
        return f"graph.lint(): {e}", None
    for n in gm.graph.nodes:
        if n.op == "call_function" and "val" not in n.meta:
            return f"node {n.name} ({n.target}) has no shape metadata (meta['val'])", n.name
    return None


def dump_graph(gm: torch.fx.GraphModule, folder: str | os.PathLike, index: int, report: PassReport) -> Path:
    """Write the graph after pass number `index` (1-based) as text: folder/NN-<pass>.txt."""
    head = [f"# graph after pass {index}: {report.name}",
            f"# created: {', '.join(report.created) or '-'}",
            f"# removed: {', '.join(report.removed) or '-'}"]
    head += [f"# note: {line}" for line in report.notes]
    return atomic_write_text(Path(folder) / f"{index:02d}-{report.name}.txt", "\n".join(head) + "\n" + str(gm.graph))


def run_pipeline(gm: torch.fx.GraphModule, ctx: PassContext, pipeline: Sequence[ModuleType],
                 options: PipelineOptions | None = None) -> PipelineReport:
    """Run each pass module of `pipeline` over gm in order. A failure becomes a PassError naming the
    pass and the passes that ran before it; so does a graph that fails the check after a pass
    (options.check_each_pass). options.dump_dir: the graph after each pass, one file per pass."""
    options = options or PipelineOptions()
    reports = []
    for index, p in enumerate(pipeline, start=1):
        try:
            report = p.run(gm, ctx)
        except PassError:
            raise
        except VsoptError:
            raise  # already a clear, user-facing error (e.g. strict mode)
        except Exception as e:  # noqa: BLE001 - re-raised with the pass named
            raise PassError(p.NAME, f"{type(e).__name__}: {e}", ran_before=tuple(ctx.ran)) from e
        reports.append(report)
        if options.dump_dir is not None:
            dump_graph(gm, options.dump_dir, index, report)
        if options.check_each_pass:
            problem = check_graph(gm)
            if problem is not None:
                message, node = problem
                raise PassError(p.NAME, f"the graph it left is broken: {message}", node=node,
                                ran_before=tuple(ctx.ran))
        ctx.ran.append(p.NAME)
    gm.graph.lint()
    gm.recompile()
    return PipelineReport(sites=list(ctx.sites), skipped=list(ctx.skipped), passes=reports, lowered=list(ctx.lowered),
                          kept_dense=dict(ctx.kept_dense), absent_plan_sites=list(ctx.absent_plan_sites))
