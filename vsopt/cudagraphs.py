"""CUDA graphs for vsopt's compiled graphs: options={"plan": P, "cudagraphs": True}.

torch.compile(mode="reduce-overhead") turns on Inductor's CUDA graphs (cudagraph trees) but is
not accepted together with options, so vsopt has its own switch (VsoptConfig.cudagraphs) and the
backend compiles each rewritten graph with Inductor's same config patch, here:

    compile_graph(aten_gm, dynamo_gm, example_inputs)   compile_fx with {"triton.cudagraphs": True}
    plan_for_cudagraphs(plan)                           the plan a replayed graph can run

Two things make that more than the patch:

- Static inputs. The backend hands Inductor an ATen graph it traced itself (vsopt.backend.to_aten),
  which has lost what Dynamo marks on its own graph: which inputs are parameters. Without it the
  cudagraph trees copy every parameter into their pool at every replay (at Wan2.1-1.3B, 2.6 GB per
  step). carry_dynamo_metadata copies that metadata onto the ATen graph, the way torch's own
  DDPOptimizer propagates it to the graphs it splits (see the note "Assumption on Dynamo
  Metadata" in torch/_functorch/_aot_autograd/frontend_utils.py), and names vsopt's own constant
  buffers (kv tables, permutations) as constants, so they are static too.
- Mask reuse (and cluster layouts: a cluster head keeps its layout and centroids across steps
  the same way, vsopt.core.clustering.CLUSTER_STATE; under CUDA graphs it is clustered cold at
  every step, refresh 1, no warm start). A dynamic head with reuse_steps > 0 decides on the host, per step, whether to
  recompute its mask (vsopt.core.dynamic.MASK_CACHE); a replayed graph does not run that
  decision, and a cached mask in the graph's memory pool would be overwritten. Under CUDA graphs
  such heads recompute their mask at every step (reuse_steps 0): exact to the plan's selection
  rule, at the cost of the scoring pass.

What else runs in the graph needs no host synchronization (docs/RUNTIME.md lists it).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch
import torch.fx

_log = logging.getLogger("vsopt.cudagraphs")

#: The Inductor config patch of torch.compile's mode="reduce-overhead".
INDUCTOR_PATCHES = {"triton.cudagraphs": True}


def static_input_indices(dynamo_gm: torch.fx.GraphModule) -> list[int]:
    """Placeholders of Dynamo's graph that Dynamo marked static (parameters, buffers, tensors given
    to torch._dynamo.mark_static_address): what the cudagraph trees do not copy at replay."""
    return [i for i, n in enumerate(dynamo_gm.graph.find_nodes(op="placeholder"))
            if n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")]


def carry_dynamo_metadata(aten_gm: torch.fx.GraphModule, dynamo_gm: torch.fx.GraphModule) -> bool:
    """Give aten_gm (traced from dynamo_gm, same inputs in the same order) the metadata AOTAutograd
    reads from a Dynamo graph to find static inputs. Returns False, changing nothing, when the
    graphs do not correspond (then parameters are copied at every replay, which is slow, not wrong)."""
    from torch._dynamo.source import ConstantSource

    theirs = list(dynamo_gm.graph.find_nodes(op="placeholder"))
    ours = list(aten_gm.graph.find_nodes(op="placeholder"))
    if "dynamo_compile_id" not in dynamo_gm.meta or len(theirs) != len(ours) \
            or not all(hasattr(n, "_dynamo_source") for n in theirs):
        return False
    sources = dict(getattr(dynamo_gm, "_param_name_to_source", None) or {})
    for name, _ in [*aten_gm.named_parameters(remove_duplicate=False), *aten_gm.named_buffers(remove_duplicate=False)]:
        sources.setdefault(name, ConstantSource(f"vsopt_constant_{name}"))  # vsopt's kv tables, permutations
    aten_gm.meta["dynamo_compile_id"] = dynamo_gm.meta["dynamo_compile_id"]
    aten_gm._param_name_to_source = sources
    for mine, dynamo in zip(ours, theirs):
        mine._dynamo_source = dynamo._dynamo_source
        if "tensor_dict" in dynamo.meta:
            mine.meta["tensor_dict"] = dynamo.meta["tensor_dict"]
    return True


def compile_graph(aten_gm: torch.fx.GraphModule, dynamo_gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """Inductor's compile_fx of vsopt's rewritten graph under CUDA graphs, parameters and vsopt's
    constants static."""
    from vsopt.inductor import compile_fx

    if not carry_dynamo_metadata(aten_gm, dynamo_gm):
        _log.warning("vsopt cudagraphs: the graph's static inputs are unknown; parameters are copied at every replay")
    return compile_fx(aten_gm, list(example_inputs), config_patches=dict(INDUCTOR_PATCHES))


def plan_for_cudagraphs(plan):
    """`plan` with every dynamic head's reuse_steps set to 0 (see the module doc); the plan itself
    when no head reuses masks (or no plan)."""
    if plan is None:
        return None
    from vsopt.core.plan import Plan

    def reuses(h) -> bool:
        keeps_layout = h.cluster is not None and (h.cluster.refresh > 1 or h.cluster.warm_start)
        return (h.dynamic is not None and h.dynamic.reuse_steps > 0) or keeps_layout

    def stateless(h):
        if h.cluster is not None:  # clustered afresh at every step: no state kept across replays
            return dataclasses.replace(h, cluster=dataclasses.replace(h.cluster, refresh=1, warm_start=False))
        return dataclasses.replace(h, dynamic=dataclasses.replace(h.dynamic, reuse_steps=0))

    def no_reuse(heads):
        return tuple(stateless(h) if reuses(h) else h for h in heads)

    changed = sorted(sid for sid, sp in plan.sites.items() if any(map(reuses, sp.all_heads())))
    if not changed:
        return plan
    _log.warning("vsopt cudagraphs: dynamic masks (and cluster layouts, cold) are recomputed at every step at %d "
                 "site(s) (%s): mask reuse and warm starts across steps do not run inside a CUDA graph",
                 len(changed), ", ".join(changed))
    sites = {sid: dataclasses.replace(sp, heads=no_reuse(sp.heads),
                                      steps=tuple(dataclasses.replace(st, heads=no_reuse(st.heads)) for st in sp.steps))
             for sid, sp in plan.sites.items()}
    return Plan(sites, dict(plan.meta))
