"""Model -> the rewritten program every export format starts from. One pipeline: the same passes
torch.compile(backend="vsopt") runs.

    1. vsopt.backend.trace_and_rewrite(model, inputs, VsoptConfig(plan)): torch.export (non-strict)
       to an ATen graph, then passes.DEFAULT_PIPELINE (detect, grid, rewrite, lower_plan,
       cancel_permutations): the rewritten GraphModule, with the plan's tables as _vsopt_* buffers.
    2. Each vsopt node gets node.meta["custom"]["vsopt"] = {site_id, heads, orders}: torch.export
       carries "custom" metadata across a re-export and into .pt2 files, and the custom ONNX form
       copies it onto its nodes.
    3. The GraphModule, taking the example inputs' leaves and returning a flat tuple of tensors
       (artifacts leave Python: no model-specific output classes), is exported again with
       torch.export.export: an ExportedProgram holding the vsopt ops, the tables as buffers.

The eager optimized model, against which every artifact is checked, is that GraphModule run
eagerly (on the CPU its vsopt ops run their PyTorch references).
"""
from __future__ import annotations

import dataclasses
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_leaves

from vsopt.core.config import VsoptConfig
from vsopt.core.errors import ConfigError, VsoptError
from vsopt.core.ir import AttentionSite
from vsopt.core.plan import Plan, Quant, Sparsity

from vsopt.plugins.onnx import NODE_META_KEY as META_KEY

from .artifact import ExportError, SiteOutcome
from .fitting import fit_plan
from .progress import Report, step

_VSOPT_OPS = ("attention", "permute_tokens", "unpermute_tokens", "block_sparse_attention", "mask_to_table",
              "dynamic_block_mask")


def flatten_outputs(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make gm take its inputs' leaves positionally and return a flat tuple of tensors (in place;
    the graph itself, not a wrapper module, so torch.export keeps its nodes' metadata)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = [x for x in tree_leaves(out.args[0]) if isinstance(x, torch.fx.Node)
              and isinstance(x.meta.get("val"), torch.Tensor)]
    out.args = (tuple(leaves),)
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()
    return gm


@dataclass
class RewrittenProgram:
    """What every format writes from. `module` is the eager optimized model: the rewritten graph
    taking `inputs` (the example inputs' leaves) and returning a flat tuple of tensors."""

    program: torch.export.ExportedProgram
    module: torch.fx.GraphModule
    inputs: tuple
    plan: Plan | None
    sites: list[SiteOutcome]
    attention_sites: list[AttentionSite]
    notes: list[str] = field(default_factory=list)
    _expected: tuple | None = None

    @property
    def device(self) -> torch.device:
        tensors = [x for x in tree_leaves(self.inputs) if isinstance(x, torch.Tensor)]
        return tensors[0].device if tensors else torch.device("cpu")

    def expected(self) -> tuple:
        """The eager optimized model's outputs on the example inputs (computed once)."""
        if self._expected is None:
            with torch.no_grad():
                self._expected = tuple(t.detach() for t in self.module(*self.inputs))
        return self._expected

    @property
    def quant_modes(self) -> set[str]:
        if self.plan is None:
            return set()
        return {h.quant.value for sp in self.plan.sites.values() for h in sp.heads}


def resolve_plan(plan: Plan | str | os.PathLike | None) -> Plan | None:
    if plan is None or isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    raise ConfigError(f"plan must be a vsopt Plan, the path of a .plan.json file, or None; got {type(plan).__name__}")


def without_quant(plan: Plan) -> tuple[Plan, str | None]:
    """The plan with every head unquantized (at every step), and a note saying what was dropped
    (None when nothing was quantized)."""
    def strip(heads):
        return tuple(dataclasses.replace(h, quant=Quant.NONE) for h in heads)

    counts: dict[str, int] = {}
    for sp in plan.sites.values():
        for h in sp.all_heads():
            if h.quant is not Quant.NONE:
                counts[h.quant.value] = counts.get(h.quant.value, 0) + 1
    if not counts:
        return plan, None
    sites = {sid: dataclasses.replace(sp, heads=strip(sp.heads),
                                      steps=tuple(dataclasses.replace(st, heads=strip(st.heads)) for st in sp.steps))
             for sid, sp in plan.sites.items()}
    what = ", ".join(f"{n} {q}" for q, n in sorted(counts.items()))
    return Plan(sites, plan.meta), f"quantization dropped ({what} head plan(s))"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _as_inputs(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def rewritten_program(model: torch.nn.Module, example_inputs: Any, plan: Plan | str | None = None, *,
                      step_index: int | None = None, progress: Report | None = None) -> RewrittenProgram:
    """Trace `model` on `example_inputs`, run vsopt's passes with `plan`, and export the result.

    A plan with step ranges is exported at one denoising step (Plan.at_step(step_index); None: its
    default head plans). A plan calibrated at another clip size is fitted to the model's sites
    (vsopt.core.resample, as torch.compile's lowering does; a note per fitted site gives its density
    change); a plan that cannot fit the model raises PlanError; a model torch.export cannot trace
    raises ExportError naming the cause."""
    from vsopt.backend import trace_and_rewrite

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"vsopt.export needs an nn.Module, got {type(model).__name__}")
    inputs = _as_inputs(example_inputs)
    flat_inputs = tuple(tree_leaves(inputs))
    plan = resolve_plan(plan)
    notes: list[str] = []
    if plan is not None and plan.step_boundaries():
        notes.append(f"the plan has step ranges (boundaries {list(plan.step_boundaries())}); exported "
                     + (f"the head plans of denoising step {step_index}" if step_index is not None
                        else "its default head plans (choose a step with step=... / --step)"))
        plan = plan.at_step(step_index)
    with step(progress, "tracing the model and running vsopt's passes"), torch.no_grad():
        try:
            gm, report = trace_and_rewrite(model, inputs, VsoptConfig(plan=plan))
        except VsoptError:
            raise
        except Exception as e:  # noqa: BLE001 - torch.export failed on the user's model: one line, the cause
            raise ExportError(f"torch.export could not trace the model: {_first_line(e)}") from e
    if plan is not None:  # a plan made at another clip size is fitted to this one, as lower_plan did
        fitted = fit_plan(plan, report.sites)
        plan = fitted.plan
        notes += fitted.lines
    _tag_nodes(gm, plan)
    module = flatten_outputs(gm)
    with step(progress, "exporting the rewritten graph (torch.export)"), torch.no_grad():
        try:
            program = torch.export.export(module, flat_inputs, strict=False)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"re-exporting the rewritten graph failed: {_first_line(e)}") from e
    sites = _outcomes(gm, report, plan)
    notes += _plan_notes(plan, sites)
    return RewrittenProgram(program, module, flat_inputs, plan, sites, list(report.sites), notes)


def _is_vsopt(n: torch.fx.Node, name: str | None = None) -> bool:
    if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
        return False
    ns, op = n.target.namespace, n.target._schema.name.split("::")[-1]
    return ns == "vsopt" and (op == name if name else op in _VSOPT_OPS)


def _launch_heads(n: torch.fx.Node) -> tuple[int, ...] | None:
    """The heads of the block-sparse launch a node feeds (a dynamic mask and its table)."""
    todo, seen = list(n.users), set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        if _is_vsopt(u, "block_sparse_attention"):
            return u.meta.get("vsopt_heads")
        if u.target is operator.getitem or _is_vsopt(u, "mask_to_table"):
            todo += list(u.users)
    return None


def _tag_nodes(gm: torch.fx.GraphModule, plan: Plan | None) -> None:
    for n in gm.graph.nodes:
        if not _is_vsopt(n) or "vsopt_site" not in n.meta:
            continue
        site_id = n.meta["vsopt_site"]
        heads = n.meta.get("vsopt_heads")
        if heads is None and (_is_vsopt(n, "dynamic_block_mask") or _is_vsopt(n, "mask_to_table")):
            heads = _launch_heads(n)
        tag: dict[str, Any] = {"site_id": site_id}
        if heads is not None:
            tag["heads"] = [int(h) for h in heads]
            if plan is not None and site_id in plan:
                hp = plan[site_id].heads
                tag["orders"] = [hp[h].order.value for h in heads]
        n.meta.setdefault("custom", {})[META_KEY] = tag


def _site_summary(plan: Plan, site_id: str) -> str:
    from vsopt.core import semantics

    sp = plan[site_id]
    kinds: dict[str, int] = {}
    for h in sp.heads:
        kinds[h.sparsity.value] = kinds.get(h.sparsity.value, 0) + 1
    orders = sorted({h.order.value for h in sp.heads})
    quants = sorted({h.quant.value for h in sp.heads})
    blocks = sorted({f"{h.block_m}x{h.block_n}" for h in sp.heads})
    try:
        dens = semantics.head_densities(sp, list(sp.heads))
        density = f"density {sum(dens) / len(dens):.2f}"
    except VsoptError:
        density = "density decided at run time"
    kinds_text = ", ".join(f"{v} {k}" for k, v in kinds.items())
    return (f"{sp.num_heads} heads ({kinds_text}), orders {'/'.join(orders)}, quant {'/'.join(quants)}, "
            f"blocks {'/'.join(blocks)}, {density}")


def _outcomes(gm: torch.fx.GraphModule, report, plan: Plan | None) -> list[SiteOutcome]:
    lowered = {n.meta.get("vsopt_site") for n in gm.graph.nodes if _is_vsopt(n, "block_sparse_attention")}
    skipped = {s.site_id: s.reason for s in report.skipped}
    out = []
    for s in report.sites:
        if s.site_id in lowered:
            out.append(SiteOutcome(s.site_id, True, _site_summary(plan, s.site_id)))
        elif s.site_id in skipped:
            out.append(SiteOutcome(s.site_id, False, skipped[s.site_id]))
        elif plan is None:
            out.append(SiteOutcome(s.site_id, False, "no plan: vsopt's exact dense attention"))
        else:
            out.append(SiteOutcome(s.site_id, False, "the plan runs it dense (every head dense, model order, no quant)"))
    return out


def _plan_notes(plan: Plan | None, sites: Sequence[SiteOutcome]) -> list[str]:
    if plan is None:
        return []
    notes = []
    optimized = {s.site_id for s in sites if s.optimized}
    dyn = [sid for sid in optimized if any(h.sparsity is Sparsity.DYNAMIC for h in plan[sid].heads)]
    if dyn:
        reuse = [sid for sid in dyn if any(h.dynamic.reuse_steps for h in plan[sid].heads if h.dynamic)]
        notes.append(f"{len(dyn)} site(s) choose their blocks at run time (dynamic heads)"
                     + (f"; reuse_steps > 0 at {len(reuse)}: the mask reuse across denoising steps is run-time "
                        "state of the vsopt op, kept as an attribute in the custom ONNX form and not at all in "
                        "the portable form (recomputed every call)" if reuse else ""))
    quant = sorted({h.quant.value for sid in optimized for h in plan[sid].heads} - {Quant.NONE.value})
    if quant:
        notes.append(f"quantized heads ({', '.join(quant)})")
    return notes


__all__ = ["flatten_outputs", "RewrittenProgram", "rewritten_program", "resolve_plan"]
