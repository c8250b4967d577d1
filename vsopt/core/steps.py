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

import json
from typing import Any, Callable, Mapping

from vsopt.core.dynamic import current_denoising_step
from vsopt.core.plan import Plan


def segment_starts(plan: Plan) -> tuple[int | None, ...]:
    """The first step of every segment of `plan`, and None (an unknown step: the default heads)."""
    return tuple(dict.fromkeys((None, 0, *plan.step_boundaries())))


class StepDispatch:
    """Calls the variant of the current denoising step's segment of a step-ranged plan. `lazy`:
    segment starts (None: the unknown step) whose variant is built on their first call."""

    def __init__(self, plan: Plan, variants: Mapping[int | None, Callable[..., Any]],
                 lazy: Mapping[int | None, Callable[[], Callable[..., Any]]] | None = None):
        self.plan, self.variants, self.lazy = plan, dict(variants), dict(lazy or {})

    def __call__(self, *args, **kwargs):
        start = self.plan.segment_start(current_denoising_step())
        fn = self.variants.get(start)
        if fn is None:
            fn = self.variants[start] = self.lazy.pop(start)()
        return fn(*args, **kwargs)


def plan_key(plan: Plan) -> tuple:
    """What a step-free plan runs, hashable: two plans with equal keys build the same graph."""
    def head(h):
        mask = None if h.mask is None else (tuple(h.mask.shape), h.mask.cpu().numpy().tobytes())
        return json.dumps(h.to_json(None), sort_keys=True), mask

    return tuple((sid, sp.q_len, sp.kv_len, str(sp.grid), tuple(head(h) for h in sp.heads))
                 for sid, sp in sorted(plan.sites.items()))


def step_variants(plan: Plan | None, build: Callable[[Plan | None], Callable[..., Any]]) -> Callable[..., Any]:
    """build(plan) when the plan has no step ranges; else a StepDispatch over one build per
    distinct plan.at_step(start) of the segment starts (segments running the same head plans share
    one). The unknown step (None: the default head plans) shares the variant of a segment with the
    same head plans, else its variant is built on its first call: a sampler that sets every step
    never runs it, so it is not compiled up front."""
    if plan is None or not plan.step_boundaries():
        return build(plan)
    built: dict[tuple, Callable[..., Any]] = {}
    variants = {}
    for start in segment_starts(plan):
        if start is None:
            continue
        at = plan.at_step(start)
        key = plan_key(at)
        if key not in built:
            built[key] = build(at)
        variants[start] = built[key]
    default = plan.at_step(None)
    same = built.get(plan_key(default))
    if same is not None:
        variants[None] = same
        return StepDispatch(plan, variants)
    return StepDispatch(plan, variants, lazy={None: lambda: build(default)})
