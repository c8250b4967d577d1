"""A plan over a whole model: its block density and its predicted attention speedup, summed over
the sites and the denoising steps. What each site's plan entry means (its densities, its launches
and their cost) is vsopt.core.semantics'; this module only adds the sites and steps up.

`calls`: site_id -> vsopt.calibration.capture.SiteCall (the site's q/k at one step), which dynamic heads need
for their density; one dict per step, or one for all steps, or None (then a top-k head counts at
its fraction and a cumulative-mass head raises: its density depends on the input)."""
from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

from vsopt.core import semantics
from vsopt.core.costmodel import CostModel
from vsopt.core.ir import AttentionSite
from vsopt.core.plan import Plan, Sparsity
from vsopt.core.resample import fit_site_plan

Calls = Mapping[str, object] | None


def _per_step(calls: Calls | Sequence[Calls], steps: int) -> list[Calls]:
    return list(calls) if isinstance(calls, (list, tuple)) else [calls] * steps


def heads_run(plan: Plan, site: AttentionSite, step: int | None):
    """The head plans the compiled model runs at `site` and `step`: the plan's entry fitted to the
    site's size (vsopt.core.resample: a plan calibrated at another clip size), or None where it
    cannot be fitted (the site then runs dense, as lower_plan leaves it)."""
    fit = fit_site_plan(plan.at_step(step)[site.site_id], site)   # at_step: renormalized heads' phases resolved
    return None if fit.plan is None else fit.plan.heads


def site_densities(plan: Plan, site: AttentionSite, calls: Calls, step: int | None) -> list[float]:
    """Per head, the block density the site's plan entry runs at `step` (semantics.head_densities,
    on the site's q/k from `calls` when a dynamic head needs them); 1 for every head of an entry
    that does not fit the site."""
    heads = heads_run(plan, site, step)
    if heads is None:
        return [1.0] * site.heads
    online = (Sparsity.DYNAMIC, Sparsity.CLUSTER)  # masks chosen on the input
    call = calls[site.site_id] if calls is not None and any(h.sparsity in online for h in heads) else None
    if call is None:
        return semantics.head_densities(site, heads)
    return semantics.head_densities(site, heads, call.q, call.k, call.scale)


def plan_density(plan: Plan, sites: Sequence[AttentionSite], calls: Calls | Sequence[Calls] = None,
                 steps: int | None = None) -> float:
    """Mean block density over the planned heads of self-attention sites (dense 1, skipped 0).

    With `steps`, the mean over denoising steps 0 .. steps - 1 of the heads each step runs (a
    plan with step ranges runs different heads at different steps); `calls` is then one dict per
    step (or one dict for all steps). Without, the plan's default heads."""
    if steps is None:
        return _step_density(plan, sites, calls, None)
    per_step = _per_step(calls, steps)
    return statistics.fmean(_step_density(plan, sites, per_step[i], i) for i in range(steps))


def _step_density(plan: Plan, sites: Sequence[AttentionSite], calls: Calls, step: int | None) -> float:
    ds = [d for s in sites if s.site_id in plan and s.is_self_attention for d in site_densities(plan, s, calls, step)]
    return statistics.fmean(ds) if ds else 1.0


def predicted_attention_speedup(plan: Plan, sites: Sequence[AttentionSite], cost: CostModel,
                                steps: int | None = None, calls: Calls | Sequence[Calls] = None) -> float:
    """Dense over planned attention time of all sites, from the cost model; with `steps`, summed
    over denoising steps 0 .. steps - 1 (each runs its step range's heads)."""
    if steps is None:
        return _predicted_step_speedup(plan, sites, cost, calls, None)
    per_step = _per_step(calls, steps)
    # total time over steps = sum of per-step times: the harmonic mean of per-step speedups
    return steps / sum(1.0 / _predicted_step_speedup(plan, sites, cost, per_step[i], i) for i in range(steps))


def _predicted_step_speedup(plan: Plan, sites: Sequence[AttentionSite], cost: CostModel, calls: Calls,
                            step: int | None) -> float:
    dense = planned = 0.0
    for s in sites:
        dense_us = semantics.dense_us(s, cost)
        dense += dense_us
        heads = heads_run(plan, s, step) if s.site_id in plan else None
        if heads is None:
            planned += dense_us
            continue
        planned += semantics.predicted_us(s, heads, cost, site_densities(plan, s, calls, step))
    return dense / max(planned, 1e-9)


def calibrated_sites_target(speedup: float, sites: Sequence[AttentionSite], cost: CostModel) -> float:
    """The predicted speedup the self-attention sites (those vsopt calibrates) must reach for the
    whole model's attention to reach `speedup`, the other sites staying dense (inf: unreachable,
    the dense sites alone take longer than the whole may)."""
    dense_all = sum(semantics.dense_us(s, cost) for s in sites)
    dense_video = sum(semantics.dense_us(s, cost) for s in sites if s.is_self_attention and s.grid is not None)
    allowed = dense_all / speedup - (dense_all - dense_video)
    return dense_video / allowed if allowed > 0 else math.inf


def plan_options(plan: Plan, sites: Sequence[AttentionSite], steps: int) -> str:
    """What a plan runs, counted over the planned self-attention sites' heads at each of `steps`
    denoising steps (e.g. "of 192 head-steps: dense 20, mask 40, dynamic 100, skip 0, ...; pooled 60, renorm 30;
    dense warm-up 1 step(s)"; the pooled remainder counted where it runs: a mass-renormalized head's at
    its measuring steps only; "renorm" counts the softmax-mass correction, "residual" residual
    sharing, of which "residual refresh" the exact measuring head-steps): which options a
    calibrated plan chose."""
    counts: dict[str, int] = {}
    pooled = renormed = shared = refresh = total = 0
    for site in sites:
        if site.site_id not in plan or not site.is_self_attention:  # as plan_density: cross-attention stays dense
            continue
        for step in range(steps):
            heads = heads_run(plan, site, step)
            if heads is None:  # not fitted to the site: it runs dense
                counts["unfitted, dense"] = counts.get("unfitted, dense", 0) + site.heads
                total += site.heads
                continue
            for h in heads:
                total += 1
                counts[h.sparsity.value] = counts.get(h.sparsity.value, 0) + 1
                # a mass-renormalized head runs its pooled remainder only where it measures
                pooled += h.remainder.value == "pooled" and (h.renorm is None or h.renorm.residual
                                                             or h.renorm.phase.value == "measure")
                renormed += h.renorm is not None and not h.renorm.residual
                shared += h.renorm is not None and h.renorm.residual
                refresh += h.renorm is not None and h.renorm.residual and h.renorm.phase.value == "measure"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return (f"of {total} head-steps: {kinds}; pooled remainder {pooled}, renorm {renormed}, residual {shared} "
            f"(refresh {refresh}); dense warm-up {plan.dense_warmup} step(s)")
