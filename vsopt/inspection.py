"""vsopt.inspect(): which attention sites vsopt finds in a model, and which it leaves alone.

    report = vsopt.inspect(model, *example_inputs, options={"grid": (4, 8, 8)})
    print(report.table())

    $ vsopt inspect mypkg.models:make_wan --grid 21,30,52 --json sites.json

FACTORY is a callable taking no arguments that returns (model, example_inputs_tuple).

How the model is traced (Trace):
- COMPILE (the default): exactly as torch.compile(model, backend="vsopt") traces it. The model runs
  once under torch.compile with a backend that runs vsopt's passes with rewrite off on every graph
  Dynamo produces (the same vsopt.backend.trace_and_rewrite the vsopt backend calls) and then runs
  Dynamo's graph as it is, uncompiled. Dynamo handles a data-dependent Python branch with a graph
  break, so such models get a report; the sites are those of all graphs, in the order Dynamo
  compiled them. The model's forward really runs once (eagerly, on the example inputs).
- EXPORT: torch.export (non-strict), as vsopt.export and calibration trace. Its graph may differ
  from Dynamo's (export stops on a data-dependent branch; ops kept whole or decomposed differently).

Where the report can still differ from what a later torch.compile rewrites, report.notes says so:
graph breaks (with Dynamo's reasons), frames Dynamo ran eagerly (attention in them is seen by
neither), site ids left relative (a graph whose frame could not be placed in the model:
passes/site_ids.py, the same note torch.compile logs). Inspect traces with static shapes (dynamic=False), as a
first torch.compile call does; a recompile with dynamic shapes can leave sites dense that this
report lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from vsopt.core.config import VsoptConfig
from vsopt.core.errors import ConfigError, VsoptError
from vsopt.core.ir import AttentionSite, SkippedSite
from vsopt.trace_modes import Trace


@dataclass
class InspectReport:
    """The attention sites of a model (graph order) and the candidates left alone.

    trace: how the model was traced; graphs: how many graphs the sites come from (Dynamo's graphs
    under Trace.COMPILE, 1 under Trace.EXPORT); notes: where this report may differ from what
    torch.compile rewrites, one line each."""

    sites: list[AttentionSite]
    skipped: list[SkippedSite]
    trace: Trace = Trace.COMPILE
    graphs: int = 1
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The sites as a fixed-width table: site, layout, heads, head_dim, N, grid, rule."""
        head = ("site", "layout", "heads", "kv", "head_dim", "N", "kv_N", "grid", "rule")
        rows = [(s.site_id, s.layout.value, str(s.heads), str(s.kv_heads), str(s.head_dim), str(s.q_len),
                 str(s.kv_len), f"{s.grid} ({s.grid_source.value})" if s.grid else "unknown", s.rule)
                for s in self.sites]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        lines.append(f"{len(self.sites)} attention site(s) in {self.graphs} graph(s), traced as "
                     f"{'torch.compile' if self.trace is Trace.COMPILE else 'torch.export'} does")
        for s in self.skipped:
            lines.append(f"left alone: {s.site_id} (node {s.node}): {s.reason}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"trace": self.trace.value, "graphs": self.graphs, "notes": list(self.notes),
                "sites": [s.to_dict() for s in self.sites],
                "skipped": [{"site_id": s.site_id, "node": s.node, "reason": s.reason, "rule": s.rule}
                            for s in self.skipped]}


def inspect(model: torch.nn.Module, *example_inputs: Any, options: Mapping[str, Any] | None = None,
            trace: Trace | str = Trace.COMPILE) -> InspectReport:
    """Find the attention sites of `model` on `example_inputs` (options as for the backend; a
    "strict" option raises on the first candidate left alone). trace: Trace.COMPILE (default, what
    torch.compile(backend="vsopt") rewrites) or Trace.EXPORT (what torch.export's graph holds)."""
    try:
        trace = Trace(trace)
    except ValueError:
        raise ConfigError(f"inspect: trace must be one of {[t.value for t in Trace]}, got {trace!r}") from None
    config = VsoptConfig.from_options({**dict(options or {}), "rewrite": False})
    if trace is Trace.EXPORT:
        from vsopt.backend import trace_and_rewrite

        try:
            with torch.no_grad():
                _gm, report = trace_and_rewrite(model, example_inputs, config)
        except VsoptError:
            raise  # the passes' own error (strict mode, a bad plan)
        except Exception as e:  # noqa: BLE001 - torch.export's failure, in one line
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            raise VsoptError(f"torch.export could not trace the model ({type(e).__name__}: {first[:200]}); "
                             f"inspect with trace='compile' (the default), which handles data-dependent "
                             f"branches as torch.compile does, with graph breaks") from e
        notes = ["traced with torch.export: torch.compile's graphs can differ (graph breaks where export "
                 "stops, ops decomposed differently); inspect with trace='compile' for what torch.compile "
                 "rewrites"]
        return InspectReport(report.sites, report.skipped, Trace.EXPORT, 1, notes)
    return _inspect_compiled(model, example_inputs, config)


def _inspect_compiled(model: torch.nn.Module, example_inputs: tuple, config: VsoptConfig) -> InspectReport:
    """Run the model once under torch.compile with a report-only backend: the passes of every graph
    Dynamo produces, each graph then run as it is."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._dynamo.utils import counters

    from vsopt.backend import report_each_module

    graphs = []  # the PipelineReport of every graph; site ids are full module paths (passes/site_ids.py)

    def report_only(gm: torch.fx.GraphModule, graph_inputs):
        # Dynamo's own graph, uncompiled (the model computes what it does eagerly); a submodule frame's
        # graph run for several modules is reported once per module, as compile plans it (PerModule)
        return report_each_module(gm, graph_inputs, config, graphs)

    before = {k: dict(v) for k, v in counters.items()}
    # static shapes, as a first torch.compile call traces (and independent of what this process
    # compiled before); a recompile limit that raises instead of silently running eagerly
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True), torch.no_grad():
        try:
            torch.compile(model, backend=report_only, dynamic=False)(*example_inputs)
        except BackendCompilerFailed as e:  # the passes' own error (strict mode, a bad plan), unwrapped
            raise e.inner_exception from None
        finally:
            # the report-only graphs must not stay in Dynamo's caches: they would count toward the
            # recompile limit of the model's next torch.compile (past it, Dynamo runs it eagerly)
            torch._dynamo.reset()
    sites = [s for r in graphs for s in r.sites]
    skipped = [s for r in graphs for s in r.skipped]
    notes = _dynamo_notes(before, counters)
    if len(graphs) > 1:
        notes += [f"site {s.site_id!r} has no grid: its graph may not hold the patch embedding (it is in another "
                  f"graph, before a graph break); give the grid with the 'grid' or 'grids' option"
                  for s in sites if s.grid is None and s.q_len == s.kv_len]
    return InspectReport(sites, skipped, Trace.COMPILE, len(graphs), notes)


DATA_DEPENDENT = "Dynamic shape operator"  # Dynamo's break reason for nonzero and the like
CAPTURE_NOTE = ("a data-dependent size (nonzero, .item()) broke the graph: where it ends a frame Dynamo runs eagerly "
                "(diffusers Mochi's text trim), its attention is in no graph; trace it with "
                "torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True) "
                "around inspect and torch.compile alike (docs/RUNTIME.md, 'Data-dependent sizes')")


def _delta(before: Mapping[str, Mapping[str, int]], counters, group: str) -> dict[str, int]:
    now, then = counters.get(group, {}), before.get(group, {})
    return {k: v - then.get(k, 0) for k, v in now.items() if v - then.get(k, 0) > 0}


def _dynamo_notes(before, counters) -> list[str]:
    """Graph breaks and frames Dynamo ran eagerly during the inspected call, from Dynamo's counters."""
    notes = []
    reasons: dict[str, int] = {}  # Dynamo counts a break as "graph_break" or, for what it cannot trace, "unimplemented"
    for group in ("graph_break", "unimplemented"):
        for reason, n in _delta(before, counters, group).items():
            first = next((line.strip() for line in str(reason).splitlines() if line.strip()), "?")
            reasons[first] = max(reasons.get(first, 0), n)
    for first, n in reasons.items():
        notes.append(f"graph break ({n}x): {first}; the sites are split over several graphs")
    if any(DATA_DEPENDENT in r for r in reasons):  # nonzero / .item() under Dynamo's defaults
        notes.append(CAPTURE_NOTE)
    frames = _delta(before, counters, "frames")
    eager = frames.get("total", 0) - frames.get("ok", 0)
    if eager > 0:
        notes.append(f"{eager} frame(s) ran eagerly (Dynamo could not compile them): an attention computed "
                     f"there is in no graph, so neither inspect nor torch.compile sees it")
    return notes


# ----------------------------------------------------------------------------- CLI
