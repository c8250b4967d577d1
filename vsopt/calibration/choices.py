"""A head's choice (candidate, precision) with its predicted error and time, and what a set of
choices means as a plan: its HeadPlans and, through vsopt.core.semantics, its predicted time.

The search prices a head alone by its marginal time (head_options: its blocks and query blocks,
its share of a permutation, the blocks it scores), which a Lagrangian can add up; a whole site is
priced by predicted_time_us, the cost model's time of the site's HeadPlans exactly as lowered
(semantics.site_work: one launch per launch group, fixed costs once), and by site_time_us, that
plus what lowering costs beyond the cost model (lowering_overhead_us: the options' per-site
overhead and the host's overhead per launch measured with the cost model)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vsopt.calibration.measure import SiteState
from vsopt.core import semantics
from vsopt.core.costmodel import CostModel, SiteWork
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
            and not cand.model_order else state.own_order
        common = dict(order=order, quant=quant if cand.sparsity is not Sparsity.SKIP else Quant.NONE,
                      block_m=state.opt.block_m, block_n=state.opt.block_n, remainder=cand.remainder,
                      renorm=cand.renorm)
        if cand.sparsity is Sparsity.MASK:
            cache[key] = HeadPlan(Sparsity.MASK, mask=cand.masks[h], **common)
        elif cand.sparsity is Sparsity.PATTERN:
            cache[key] = HeadPlan(Sparsity.PATTERN, pattern=cand.pattern, **common)
        elif cand.sparsity is Sparsity.DYNAMIC:
            cache[key] = HeadPlan(Sparsity.DYNAMIC, dynamic=cand.dynamic, **common)
        elif cand.sparsity is Sparsity.CLUSTER:   # its order comes from its clustering: FHW here
            cache[key] = HeadPlan(Sparsity.CLUSTER, cluster=cand.cluster, **common)
        else:
            cache[key] = HeadPlan(cand.sparsity, **common)
    return cache[key]


def head_plans(state: SiteState, choices: Sequence[HeadChoice]) -> tuple[HeadPlan, ...]:
    """The site's plan entry for these choices, one HeadPlan per query head."""
    return tuple(head_plan(state, h, ch.candidate, ch.quant) for h, ch in enumerate(choices))


def predicted_time_us(state: SiteState, choices: Sequence[HeadChoice], cost: CostModel) -> float:
    """Cost-model time of the site with these choices, as lowered (semantics.predicted_us at the
    measured densities)."""
    return _predicted_us(state, choices, head_plans(state, choices), cost)


def _predicted_us(state: SiteState, choices: Sequence[HeadChoice], plans: Sequence[HeadPlan],
                  cost: CostModel) -> float:
    return semantics.predicted_us(state.site, plans, cost, [ch.density for ch in choices])


HOST_OVERHEAD_KEY = "host_overhead_us_not_in_model"  # the cost model's meta: kernel key -> host us per call


def host_launch_us(cost: CostModel, quant: Quant, head_dim: int, block_m: int, block_n: int) -> float:
    """The host's overhead of one kernel call in this configuration, as measured with the cost
    model (benchmarks/fit_cost_model.py: an eager call minus its CUDA-graph replay); the nearest
    measured head dim of the same precision and blocks (host work does not grow with it), else 0."""
    table = cost.meta.get(HOST_OVERHEAD_KEY) or {}
    same = []
    for key, us in table.items():
        q, d, blocks = key.split("/")
        if q == Quant(quant).value and blocks == f"{block_m}x{block_n}":
            same.append((abs(int(d[1:]) - head_dim), float(us)))
    return min(same)[1] if same else 0.0


def lowering_overhead_us(state: SiteState, choices: Sequence[HeadChoice], cost: CostModel) -> float:
    """What lowering the site costs beyond the cost model's GPU time: nothing for a site left
    dense (the lowering leaves it alone); else CalibrationOptions.site_overhead_us, plus the cost
    model's measured per-site overhead in a compiled model (CostModel.lowering_overhead_us: without
    CUDA graphs when host_overhead, else with them; one launch group measured), plus with
    host_overhead the host's overhead of each kernel launch the measurement does not cover (every
    launch group where the cost model has no per-site overhead, else those after the first).
    Where the cost model has the overhead per launch group and permutation, measured through
    torch.compile (CostModel.has_group_overhead), that is the price instead
    (semantics.lowering_overhead_us): an eager op call's host time, which is what
    host_launch_us charges, is several times what a launch costs inside a compiled graph."""
    return _lowering_overhead_us(state, head_plans(state, choices), cost)


def _lowering_overhead_us(state: SiteState, plans: Sequence[HeadPlan], cost: CostModel) -> float:
    if semantics.left_alone(plans):   # is_dense
        return 0.0
    cudagraphs = not state.opt.host_overhead
    if cost.has_group_overhead(cudagraphs):   # measured per launch group (benchmarks/host_overhead.py)
        return state.opt.site_overhead_us + semantics.lowering_overhead_us(state.site, plans, cost, cudagraphs)
    t = state.opt.site_overhead_us + cost.lowering_overhead_us(cudagraphs=cudagraphs)
    t += semantics.extra_ops(plans) * cost.op_cost_us(cudagraphs)
    if state.opt.host_overhead:
        measured = "eager" in cost.overhead_us
        for i, key in enumerate(semantics.launch_groups(plans)):
            if not (measured and i == 0):
                t += host_launch_us(cost, key.quant, state.site.head_dim, key.block_m, key.block_n)
    return t


def overhead_basis(state: SiteState, choices: Sequence[HeadChoice], cost: CostModel) -> str:
    """How the site's time was priced, for the plan's dense reasons and the report."""
    mode = "without CUDA graphs (host overhead charged)" if state.opt.host_overhead else "under CUDA graphs"
    return f"priced {mode}, lowering overhead {lowering_overhead_us(state, choices, cost):.1f} us"


def site_time_us(state: SiteState, choices: Sequence[HeadChoice], cost: CostModel) -> float:
    """The site's predicted time with these choices: the cost model's, plus the lowering overhead
    (the head plans built once for both: the searches call this for every trial)."""
    plans = head_plans(state, choices)
    return _predicted_us(state, choices, plans, cost) + _lowering_overhead_us(state, plans, cost)


def _marginal_us(state: SiteState, hp: HeadPlan, density: float, cost: CostModel) -> float:
    """A head's own time: its launch's per-block and per-query-block work (the launch's fixed cost
    is shared, and charged by predicted_time_us), its permutation share, its scored blocks, its
    pooled remainder (its share of one site-wide pooled attention, and its merge) and 1/heads of
    its launch group's extra ATen ops (semantics.extra_ops; shared like the fixed costs)."""
    work = semantics.site_work(state.site, [hp], [density])
    t = sum(cost.predict_us(SiteWork((launch,))) - cost.launch_cost_us(launch) for launch in work.launches)
    heads = state.site.heads
    t += sum(cost.pooled_attention_us(bh * heads, n, kb, d) / heads for bh, n, kb, d in work.pooled)
    t += work.extra_mib * cost.permute_us_per_mib
    t += work.extra_ops * cost.op_cost_us(not state.opt.host_overhead) / heads
    # the search charges a permuted head 1/heads of its own data moved, a tie-breaker between
    # orders (the site's real permutation cost, every head gathered, is in predicted_time_us)
    own = semantics.permuted_mib(state.site, semantics.permuted_heads([hp], state.site.grid))
    t += own * cost.permute_us_per_mib / state.site.heads
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


def is_dense(state: SiteState, choices: Sequence[HeadChoice]) -> bool:
    """Whether these choices leave the site the model's own attention (every head dense, in the
    model's order, unquantized): lowering then leaves it alone, at no cost."""
    return semantics.left_alone(head_plans(state, choices))
