"""A head's choice (candidate, precision) with its predicted error and time, and what a set of
choices means as a plan: its HeadPlans and, through vsopt.core.semantics, its predicted time.

The search prices a head alone by its marginal time (head_options: its blocks and query blocks,
its share of a permutation, the blocks it scores), which a Lagrangian can add up; a whole site is
priced by predicted_time_us, the cost model's time of the site's HeadPlans exactly as lowered
(semantics.site_work: one launch per launch group, fixed costs once)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vsopt.calibration.measure import SiteState
from vsopt.core import semantics
from vsopt.core.costmodel import CostModel, SiteWork
from vsopt.core.orders import TokenOrder
from vsopt.core.plan import HeadPlan, Quant, Sparsity


@dataclass(frozen=True)
class HeadChoice:
    """What the search picked for one head, with its predicted squared error and time."""

    candidate: int
    quant: Quant
    err2: float
    time_us: float
    density: float


def head_plan(state: SiteState, h: int, candidate: int, quant: Quant) -> HeadPlan:
    """Head h's HeadPlan for a candidate and precision (memoized on the state: the searches ask
    for the same ones many times)."""
    cache, key = state.plans, (h, candidate, quant, state.opt.block_m, state.opt.block_n)
    if key not in cache:
        cand = state.candidates[candidate]
        # a dense or skipped head gains nothing from a permutation: keep the model's order
        order = state.head_orders[h] if cand.sparsity in (Sparsity.MASK, Sparsity.PATTERN, Sparsity.DYNAMIC) \
            and not cand.model_order else TokenOrder.FHW
        common = dict(order=order, quant=quant if cand.sparsity is not Sparsity.SKIP else Quant.NONE,
                      block_m=state.opt.block_m, block_n=state.opt.block_n)
        if cand.sparsity is Sparsity.MASK:
            cache[key] = HeadPlan(Sparsity.MASK, mask=cand.masks[h], **common)
        elif cand.sparsity is Sparsity.PATTERN:
            cache[key] = HeadPlan(Sparsity.PATTERN, pattern=cand.pattern, **common)
        elif cand.sparsity is Sparsity.DYNAMIC:
            cache[key] = HeadPlan(Sparsity.DYNAMIC, dynamic=cand.dynamic, **common)
        else:
            cache[key] = HeadPlan(cand.sparsity, **common)
    return cache[key]


def head_plans(state: SiteState, choices: Sequence[HeadChoice]) -> tuple[HeadPlan, ...]:
    """The site's plan entry for these choices, one HeadPlan per query head."""
    return tuple(head_plan(state, h, ch.candidate, ch.quant) for h, ch in enumerate(choices))


def predicted_time_us(state: SiteState, choices: Sequence[HeadChoice], cost: CostModel) -> float:
    """Cost-model time of the site with these choices, as lowered (semantics.predicted_us at the
    measured densities)."""
    return semantics.predicted_us(state.site, head_plans(state, choices), cost, [ch.density for ch in choices])


def _marginal_us(state: SiteState, hp: HeadPlan, density: float, cost: CostModel) -> float:
    """A head's own time: its launch's per-block and per-query-block work (the launch's fixed cost
    is shared, and charged by predicted_time_us), its permutation share and its scored blocks."""
    work = semantics.site_work(state.site, [hp], [density])
    t = sum(cost.predict_us(SiteWork((launch,))) - cost.launch_cost_us(launch) for launch in work.launches)
    # the search has always charged a permuted head 1/heads of its own data moved (the site's
    # real permutation cost is in predicted_time_us)
    t += work.permuted_mib * cost.permute_us_per_mib / state.site.heads
    return t + work.scored_blocks * cost.score_us_per_block


def head_options(state: SiteState, cost: CostModel, quants: Sequence[Quant]) -> list[list[HeadChoice]]:
    """Every (candidate, quant) of every head with its predicted squared error and marginal time (µs).
    Predicted error^2 = the candidate's sparse error^2 + the precision's extra error^2 over bf16 at
    full density (independent errors add in squares)."""
    opt = state.opt
    dense_none = state.quant_err2[:, opt.quants.index(Quant.NONE)]
    options = []
    for h in range(state.site.heads):
        per_head = []
        for c, cand in enumerate(state.candidates):
            density = float(state.density[h, c]) / max(1, state.error_calls)
            for quant in quants:
                if cand.sparsity is Sparsity.SKIP and quant is not Quant.NONE:
                    continue
                extra = max(0.0, float(state.quant_err2[h, opt.quants.index(quant)] - dense_none[h]))
                err2 = float(state.err2[h, c]) + (extra if cand.sparsity is not Sparsity.SKIP else 0.0)
                t = _marginal_us(state, head_plan(state, h, c, quant), density, cost)
                per_head.append(HeadChoice(c, quant, err2, t, density))
        options.append(per_head)
    return options


def dense_choices(state: SiteState) -> list[HeadChoice]:
    """Every head dense, unquantized (the site stays the model's own attention)."""
    none = state.opt.quants.index(Quant.NONE)
    return [HeadChoice(0, Quant.NONE, float(state.quant_err2[h, none]), 0.0, 1.0) for h in range(state.site.heads)]
