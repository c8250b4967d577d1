"""Running a plan with step ranges: one variant per segment of denoising steps, picked per call.

A plan whose sites change head plans at some denoising steps (Plan.step_boundaries) runs, at
step i, the head plans of the segment holding i (Plan.segment_start). Whoever runs such a plan
(the torch.compile backend, the bench's sampler) builds one variant per segment and dispatches on
vsopt.set_denoising_step's step, here, once:

    run = step_variants(plan, lambda p: compile(p))    # p: plan.at_step(start), no step ranges
    run(*args)                                         # the variant of the current step's segment

A plan without step ranges (or no plan) is built once, as it is, and called directly.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from vsopt.core.dynamic import current_denoising_step
from vsopt.core.plan import Plan


def segment_starts(plan: Plan) -> tuple[int | None, ...]:
    """The first step of every segment of `plan`, and None (an unknown step: the default heads)."""
    return tuple(dict.fromkeys((None, 0, *plan.step_boundaries())))


class StepDispatch:
    """Calls the variant of the current denoising step's segment of a step-ranged plan."""

    def __init__(self, plan: Plan, variants: Mapping[int | None, Callable[..., Any]]):
        self.plan, self.variants = plan, dict(variants)

    def __call__(self, *args, **kwargs):
        return self.variants[self.plan.segment_start(current_denoising_step())](*args, **kwargs)


def step_variants(plan: Plan | None, build: Callable[[Plan | None], Callable[..., Any]]) -> Callable[..., Any]:
    """build(plan) when the plan has no step ranges; else a StepDispatch over
    build(plan.at_step(start)) for each segment start."""
    if plan is None or not plan.step_boundaries():
        return build(plan)
    return StepDispatch(plan, {start: build(plan.at_step(start)) for start in segment_starts(plan)})
