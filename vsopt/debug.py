"""`vsopt diff`: what the optimizer changed, what it left alone and why, and where error enters.

    report = vsopt.diff(model, example_inputs, plan="wan.plan.json")
    print(report.render_text())            # both views, 80 columns, colour on a tty
    report.write_json("diff.json")          # stable across runs for the same inputs
    report.write_html("diff.html")          # one self-contained page

The report has two views, each built by its own module:
  structural (vsopt.debug_graph): the ATen graph before the passes aligned with the graph after
      them by provenance; per attention site in execution order, the original ops (with source
      file and line) beside what replaced them and the plan entry per head; every site or
      candidate left alone with the reason its rule gave.
  numerical (vsopt.debug_numeric): per site and head, cosine / relative L2 / max error, isolated
      and accumulated; the model output's PSNR and relative L2; the first site over a threshold;
      optionally over a sampler's steps.
Renderers: vsopt.debug_text (terminal) and vsopt.debug_html (the page).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx
from torch.utils._pytree import tree_leaves

from vsopt.core.errors import ConfigError, VsoptError
from vsopt.core.ir import AttentionSite, SkippedSite
from vsopt.debug_graph import ChangeRegion, SourceLocation, StructuralDiff, diff_graphs, source_location
from vsopt.debug_numeric import (DEFAULT_THRESHOLD, NumericalDiff, SiteProbe, StepDiff, measure,
                                 measure_trajectory)

REPORT_VERSION = 1


@dataclass
class SiteEntry:
    """One attention site or candidate, as both views show it.

    status: "rewritten" (the passes replaced it), "left alone" (a rule declined it: `reason`
    says why) or "unchanged" (detected, but no node of the graph changed). A rewritten site can
    carry a reason too, when a later pass declined part of what the plan asked (e.g. kept dense).
    site_id is the site's id; a candidate whose id another entry already has gets "id@node"."""

    site_id: str
    status: str
    rule: str
    reason: str | None
    node: str  # the before-graph node it is anchored on (the attention output, or the candidate)
    source: SourceLocation | None
    site: AttentionSite | None  # None for candidates that never became sites
    region: ChangeRegion | None
    plan_heads: list[dict[str, Any]] = field(default_factory=list)  # one dict per head; [] without a plan

    def to_dict(self, regions: Sequence[ChangeRegion] = ()) -> dict[str, Any]:
        """As JSON data; the region is given as its index in `regions` (the structure's list)."""
        index = next((i for i, r in enumerate(regions) if r is self.region), None)
        return {"site_id": self.site_id, "status": self.status, "rule": self.rule, "reason": self.reason,
                "node": self.node, "source": self.source.to_dict() if self.source else None,
                "site": self.site.to_dict() if self.site else None, "region": index, "plan_heads": self.plan_heads}


@dataclass
class DiffReport:
    """Everything `vsopt diff` found. `entries` are in execution order; `numerical` is None when
    numerics were not asked for; `steps` is empty unless a sampler was given."""

    model: str
    entries: list[SiteEntry]
    structure: StructuralDiff
    numerical: NumericalDiff | None
    steps: list[StepDiff] = field(default_factory=list)

    def entry(self, site_id: str) -> SiteEntry:
        for e in self.entries:
            if e.site_id == site_id:
                return e
        raise KeyError(f"no site {site_id!r} in the report; sites are {[e.site_id for e in self.entries]}")

    @property
    def rewritten(self) -> list[SiteEntry]:
        return [e for e in self.entries if e.status == "rewritten"]

    @property
    def left_alone(self) -> list[SiteEntry]:
        return [e for e in self.entries if e.status != "rewritten"]

    def to_dict(self) -> dict[str, Any]:
        regions = self.structure.regions
        return {"version": REPORT_VERSION, "model": self.model, "entries": [e.to_dict(regions) for e in self.entries],
                "structure": self.structure.to_dict(),
                "numerical": self.numerical.to_dict() if self.numerical else None,
                "steps": [s.to_dict() for s in self.steps]}

    def to_json(self) -> str:
        """The report as JSON: keys sorted, floats to 6 significant digits, inf/nan as strings,
        no timestamps or addresses, so the same inputs give the same bytes."""
        return json.dumps(_stable(self.to_dict()), sort_keys=True, indent=1, allow_nan=False) + "\n"

    def render_text(self, width: int = 80, color: bool = False) -> str:
        from vsopt.debug_text import render_text
        return render_text(self, width=width, color=color)

    def render_html(self) -> str:
        from vsopt.debug_html import render_html
        return render_html(self)

    def write_json(self, path: str | os.PathLike) -> Path:
        return _write_atomic(path, self.to_json())

    def write_html(self, path: str | os.PathLike) -> Path:
        return _write_atomic(path, self.render_html())


def _stable(obj: Any) -> Any:
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return str(obj)  # "inf", "-inf", "nan": JSON has no such numbers
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {str(k): _stable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_stable(v) for v in obj]
    return obj


def _write_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- building the report


def plan_heads(plan: Any, site_id: str) -> list[dict[str, Any]]:
    """The plan entry of a site (a vsopt.core.plan.Plan), one dict per head: sparsity, pattern,
    order, quant (precision), block, density (None where it is decided at run time). The
    step-independent head plans; [] when the plan has no entry."""
    if plan is None or site_id not in plan:
        return []
    site_plan = plan[site_id]
    rows = []
    for head in site_plan.heads_at(None):
        try:
            mask = head.block_mask(site_plan.q_len, site_plan.kv_len, site_plan.grid)
        except ValueError:  # a pattern the site's grid cannot hold: lower_plan says why it stays dense
            mask = None
        rows.append({"sparsity": head.sparsity.value, "pattern": head.pattern.KIND if head.pattern else None,
                     "order": head.order.value, "quant": head.quant.value, "block": [head.block_m, head.block_n],
                     "density": float(mask.float().mean()) if mask is not None else None})
    return rows


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
                 model_name: str = "model", pass_order: Sequence[str] = ()) -> DiffReport:
    """The report from the graphs before and after the passes and what the pipeline found.

    inputs: the graphs' flat inputs for the numerical view (None: structural view only).
    sampler: see vsopt.debug_numeric.measure_trajectory (the view over sampling steps).
    pass_order: the names of the passes in the order they ran."""
    site_nodes = {s.site_id: (*s.nodes, s.output_node) for s in sites}
    anchors = {**{s.site_id: s.node for s in skipped}, **{s.site_id: s.output_node for s in sites}}
    structure = diff_graphs(before.graph, after.graph, site_nodes, anchors, pass_order)
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
        vsopt.debug_numeric.measure_trajectory); it is called with the traced graphs, which take
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
    after, pipeline = trace_and_rewrite(model, example_inputs, config)
    flat = _flat_inputs(after, example_inputs) if numerics else None
    return build_report(before, after, pipeline.sites, pipeline.skipped, plan=config.plan, inputs=flat,
                        threshold=threshold, sampler=sampler, model_name=type(model).__name__,
                        pass_order=[p.name for p in pipeline.passes])


def _flat_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[Any]:
    flat = tree_leaves(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat):
        raise VsoptError(f"the traced graph takes {len(placeholders)} inputs but the example inputs flatten to "
                         f"{len(flat)}")
    return flat


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODULE:FACTORY",
                        help="a function returning (model, example_inputs) or (model, example_inputs, sampler), "
                             "e.g. vsopt.debug_targets:reference")
    parser.add_argument("--plan", metavar="P", help="plan JSON file (default: every site dense)")
    parser.add_argument("--html", metavar="OUT.html", help="write the report as one self-contained HTML page")
    parser.add_argument("--json", metavar="OUT.json", help="write the report as JSON")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"relative L2 of a site output above which it is flagged (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--no-numerics", action="store_true", help="structural view only: do not run the model")
    parser.add_argument("--steps", action="store_true",
                        help="also measure over the sampling steps (the factory must return a sampler too)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour in the terminal (auto: only when stdout is a tty)")


def load_factory(target: str) -> tuple[torch.nn.Module, tuple[Any, ...], Callable | None]:
    """Call MODULE:FACTORY (or path/to/file.py:FACTORY, as `vsopt inspect` takes it); it must return
    (model, example_inputs) or (model, example_inputs, sampler). Returns (model, example_inputs,
    sampler or None)."""
    from vsopt.io import load_factory as resolve

    made = resolve(target)()
    if not (isinstance(made, tuple) and len(made) in (2, 3) and isinstance(made[0], torch.nn.Module)
            and (len(made) == 2 or made[2] is None or callable(made[2]))):
        raise ConfigError(f"{target} must return (model, example_inputs) or (model, example_inputs, sampler), "
                          f"got {type(made).__name__}")
    model, inputs = made[0], made[1]
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return model, inputs, made[2] if len(made) == 3 else None


def run_cli(args: argparse.Namespace) -> int:
    if not math.isfinite(args.threshold) or args.threshold <= 0:
        raise ConfigError(f"--threshold must be a positive number, got {args.threshold}")
    model, inputs, sampler = load_factory(args.target)
    if args.steps and sampler is None:
        raise ConfigError(f"--steps needs a sampler: {args.target} returned (model, example_inputs) only")
    report = diff(model, inputs, plan=args.plan, threshold=args.threshold, numerics=not args.no_numerics,
                  sampler=sampler if args.steps else None)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(report.render_text(width=80, color=color))
    if args.json:
        print(f"wrote {report.write_json(args.json)}")
    if args.html:
        print(f"wrote {report.write_html(args.html)}")
    return 0
