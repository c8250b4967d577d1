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

Variants whose plans run the same head plans (plan_key) share one build, and the unknown step's
(None: the default head plans) is built on its first call unless a built variant runs the same:
a sampler that sets every step never runs it, so it is not compiled up front.
"""
from __future__ import annotations

import json
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
    renormalized heads) of a step-ranged or renormalized plan. `lazy`: variant keys whose variant
    is built on their first call."""

    def __init__(self, plan: Plan, variants: Mapping[tuple, Callable[..., Any]],
                 lazy: Mapping[tuple, Callable[[], Callable[..., Any]]] | None = None):
        self.plan, self.variants, self.lazy = plan, dict(variants), dict(lazy or {})
        self.keys: dict[int | None, tuple] = {}   # step -> variant key (20 us of Python each, once)

    def __call__(self, *args, **kwargs):
        step = current_denoising_step()
        key = self.keys.get(step)
        if key is None:
            key = self.keys[step] = variant_key(self.plan, step)
        fn = self.variants.get(key)
        if fn is None:
            fn = self.variants[key] = self.lazy.pop(key)()
        return fn(*args, **kwargs)


def plan_key(plan: Plan) -> tuple:
    """What a step-free plan runs, hashable: two plans with equal keys build the same graph."""
    def head(h):
        mask = None if h.mask is None else (tuple(h.mask.shape), h.mask.cpu().numpy().tobytes())
        phase = None if getattr(h, "renorm", None) is None else str(h.renorm.phase)
        return json.dumps(h.to_json(None), sort_keys=True, default=str), mask, phase

    return tuple((sid, sp.q_len, sp.kv_len, str(sp.grid), tuple(head(h) for h in sp.heads))
                 for sid, sp in sorted(plan.sites.items()))


def step_variants(plan: Plan | None, build: Callable[[Plan | None], Callable[..., Any]]) -> Callable[..., Any]:
    """build(plan) when the plan has neither step ranges nor renormalized heads; else a
    StepDispatch over build(plan.at_step(step)) for a step of each variant (variant_steps), one
    build per distinct plan (plan_key); the unknown step's variant shares a build that runs the
    same heads, else it is built on its first call. Where every variant, the unknown step's too,
    is one build, that build itself (nothing to pick per call)."""
    if plan is None or not (plan.step_boundaries() or _renormalizes(plan)):
        return build(plan)
    built: dict[tuple, Callable[..., Any]] = {}
    variants, lazy = {}, {}
    steps = variant_steps(plan)
    for key, step in steps.items():
        if step is None:
            continue
        at = plan.at_step(step)
        pk = plan_key(at)
        if pk not in built:
            built[pk] = build(at)
        variants[key] = built[pk]
    for key, step in steps.items():
        if step is None and key not in variants:
            default = plan.at_step(None)
            same = built.get(plan_key(default))
            if same is not None:
                variants[key] = same
            else:
                lazy[key] = lambda default=default: build(default)
    if not lazy and len({id(fn) for fn in variants.values()}) == 1:
        # every step runs the same heads (e.g. a plan whose ranges are all dense): no dispatch per call
        return next(iter(variants.values()))
    return StepDispatch(plan, variants, lazy)
