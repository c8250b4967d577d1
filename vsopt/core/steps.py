"""Running a plan with step ranges: one variant per segment of denoising steps, picked per call.

A plan whose sites change head plans at some denoising steps (Plan.step_boundaries) runs, at
step i, the head plans of the segment holding i (Plan.segment_start). Whoever runs such a plan
(the torch.compile backend, the bench's sampler) builds one variant per segment and dispatches on
vsopt.set_denoising_step's step, here, once:

    run = step_variants(plan, lambda p: compile(p))    # p: plan.at_step(start), no step ranges
    run(*args)                                         # the variant of the current step's segment

A plan without step ranges (or no plan) is built once, as it is, and called directly.

Renormalized heads (HeadPlan.renorm, Re-ttention) measure at some steps of a segment and correct
at the others (Plan.at_step resolves the phase): the variants are then keyed by the segment's
start and the heads' phases (Plan.renorm_phases), one graph per distinct pair; the phases of a
segment repeat with the least common multiple of the heads' periods, so there are few.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from vsopt.core.dynamic import current_denoising_step
from vsopt.core.plan import Plan


def segment_starts(plan: Plan) -> tuple[int | None, ...]:
    """The first step of every segment of `plan`, and None (an unknown step: the default heads)."""
    return tuple(dict.fromkeys((None, 0, *plan.step_boundaries())))


MAX_PHASE_PERIOD = 4096  # the longest repeat of renorm phases whose variants are enumerated


def variant_key(plan: Plan, step: int | None) -> tuple:
    """Which variant runs `step`: its segment's start and the renormalized heads' phases."""
    return (plan.segment_start(step), plan.renorm_phases(step))


def variant_steps(plan: Plan) -> dict[tuple, int | None]:
    """A representative step for every variant key of `plan` (None: the unknown step)."""
    starts = segment_starts(plan)
    bounds = sorted(b for b in starts if b is not None)
    out: dict[tuple, int | None] = {variant_key(plan, None): None}
    for i, a in enumerate(bounds):
        stop = bounds[i + 1] if i + 1 < len(bounds) else None
        periods = {h.renorm.every for sp in plan.sites.values() for h in sp.heads_at(a) if h.renorm is not None}
        period = math.lcm(*periods) if periods else 1
        if period > MAX_PHASE_PERIOD:
            raise ValueError(f"the renorm periods {sorted(periods)} of the segment from step {a} repeat only every "
                             f"{period} steps (at most {MAX_PHASE_PERIOD}): choose periods with a smaller common "
                             "multiple")
        for s in range(a, a + period if stop is None else min(stop, a + period)):
            out.setdefault(variant_key(plan, s), s)
    return out


def _renormalizes(plan: Plan) -> bool:
    return any(h.renorm is not None for sp in plan.sites.values() for h in sp.all_heads())


class StepDispatch:
    """Calls the variant of the current denoising step (its segment, and the phases of its
    renormalized heads) of a step-ranged or renormalized plan."""

    def __init__(self, plan: Plan, variants: Mapping[tuple, Callable[..., Any]]):
        self.plan, self.variants = plan, dict(variants)

    def __call__(self, *args, **kwargs):
        return self.variants[variant_key(self.plan, current_denoising_step())](*args, **kwargs)


def step_variants(plan: Plan | None, build: Callable[[Plan | None], Callable[..., Any]]) -> Callable[..., Any]:
    """build(plan) when the plan has neither step ranges nor renormalized heads; else a
    StepDispatch over build(plan.at_step(step)) for a step of each variant (variant_steps)."""
    if plan is None or not (plan.step_boundaries() or _renormalizes(plan)):
        return build(plan)
    return StepDispatch(plan, {key: build(plan.at_step(step)) for key, step in variant_steps(plan).items()})
