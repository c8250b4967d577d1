"""The budgeted searches: per head one (candidate, precision), fastest under an error budget or
least error under a density or time budget.

Each is a Lagrangian relaxation: for a price on error (or on blocks, or on time), every head
independently takes the option minimizing time + price * error (or error + price * cost); the
price is bisected on a log scale (bisect_price) to the cheapest one whose choice fits, and a
greedy pass spends what the relaxation left unused. Per-head prices cannot see a site's fixed
costs (a launch per kernel configuration, a permutation, dynamic scoring), so whole sites are
compared by their full predicted time (choices.site_time_us: the cost model's time of the site as
lowered, plus what lowering costs beyond it). No search keeps a site whose plan is predicted no
faster than dense (never_slower), except the density search, which is asked for a density.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from vsopt.calibration.budgets import Budget, DensityBudget, SiteErrorBudget, SpeedupBudget, budget_text
from vsopt.calibration.choices import (HeadChoice, dense_choices, head_options, is_dense, overhead_basis,
                                      predicted_time_us, site_time_us)
from vsopt.calibration.measure import SiteState
from vsopt.core import semantics
from vsopt.core.costmodel import CostModel
from vsopt.core.errors import ConfigError
from vsopt.core.plan import Quant, Sparsity

T = TypeVar("T")
Options = list[list[HeadChoice]]  # per head, its options


def bisect_price(pick: Callable[[float], T], feasible: Callable[[T], bool], scale: float = 1.0,
                 iterations: int = 50) -> tuple[T, bool]:
    """The pick at the lowest price 10**x / scale, x in [-12, 12], whose result is feasible
    (feasibility must grow with the price), by bisection over x. Returns (pick, True), or the
    pick at the highest price and False when even that is infeasible."""
    lo, hi = -12.0, 12.0
    best = pick(10.0 ** hi / scale)
    if not feasible(best):
        return best, False
    for _ in range(iterations):
        mid = (lo + hi) / 2
        choice = pick(10.0 ** mid / scale)
        if feasible(choice):
            hi, best = mid, choice
        else:
            lo = mid
    return best, True


def _pick(options: Options, lam: float) -> list[HeadChoice]:
    """Per head, the option minimizing time + lam * err2 (ties: the lower error)."""
    return [min(opts, key=lambda o: (o.time_us + lam * o.err2, o.err2)) for opts in options]


def _greedy_moves(options: Options, choice: list[HeadChoice], limit: float, spent: Callable[[HeadChoice], float],
                  score: Callable[[HeadChoice, HeadChoice], tuple | float | None]) -> list[HeadChoice]:
    """Greedy finish of a Lagrangian solution: repeatedly make the single-head move (current ->
    another option of that head) with the highest score(current, option) (None: not a move), while
    the summed spent(option) over heads stays within `limit` (ties: the first head and option)."""
    choice = list(choice)
    used = sum(spent(o) for o in choice)
    while True:
        best = None
        for h, opts in enumerate(options):
            cur = choice[h]
            for o in opts:
                extra = spent(o) - spent(cur)
                if used + extra > limit:  # the same sum as the bookkeeping below
                    continue
                value = score(cur, o)
                if value is not None and (best is None or value > best[0]):
                    best = (value, h, o, extra)
        if best is None:
            return choice
        _, h, o, extra = best
        used += extra
        choice[h] = o


def _spend_slack(options: Options, choice: list[HeadChoice], limit: float) -> list[HeadChoice]:
    """Greedy finish of the error relaxation, which may leave part of the error budget unused:
    the single-head move that saves the most time, while the error stays within `limit`."""
    def saving(cur: HeadChoice, o: HeadChoice) -> float | None:
        saved = cur.time_us - o.time_us
        return saved if saved > 1e-12 else None

    return _greedy_moves(options, choice, limit, lambda o: o.err2, saving)


def search_site_error(state: SiteState, cost: CostModel, max_rel_l2: float) -> list[HeadChoice]:
    """Fastest per-head choice whose predicted site error is within max_rel_l2 (the site's dense
    choices when no plan within it is predicted faster than dense): fastest_within_error, then
    never_slower."""
    return never_slower(state, fastest_within_error(state, cost, max_rel_l2), cost)[0]


def fastest_within_error(state: SiteState, cost: CostModel, max_rel_l2: float) -> list[HeadChoice]:
    """Fastest per-head choice whose predicted site error is within max_rel_l2: a Lagrangian
    relaxation (per head, minimize time + lambda * error^2, lambda bisected) finished greedily.
    Each precision costs a launch of its own, which per-head costs cannot see: the search runs
    once with every precision allowed per head and once per single precision (plus skips), and
    keeps the fastest feasible result by the full site cost."""
    norm2 = float(state.norm2.sum())
    limit = (max_rel_l2 ** 2) * norm2

    def fits(choice):
        return sum(o.err2 for o in choice) <= limit

    results = []
    quant_sets = [state.opt.quants] + ([(q,) for q in state.opt.quants] if len(state.opt.quants) > 1 else [])
    for quants in quant_sets:
        options = head_options(state, cost, quants)
        choice, ok = bisect_price(lambda lam: _pick(options, lam), fits, scale=norm2 / 1e3)
        if not ok:  # even the most accurate Lagrangian choice misses: take the most accurate options
            choice = [min(opts, key=lambda o: (o.err2, o.time_us)) for opts in options]
        if fits(choice):
            choice = _spend_slack(options, choice, limit)
        err = sum(o.err2 for o in choice)
        results.append((err > limit, site_time_us(state, choice, cost) if err <= limit else err, choice))
    return min(results, key=lambda r: (r[0], r[1]))[2]


def never_slower(state: SiteState, choices: list[HeadChoice], cost: CostModel) -> tuple[list[HeadChoice], str | None]:
    """(choices, None), or the site's dense choices and the reason when the plan, with what
    lowering a site costs beyond the cost model (choices.lowering_overhead_us), is predicted no
    faster than the model's own dense attention (which costs no lowering)."""
    if is_dense(state, choices):
        return choices, None
    planned = site_time_us(state, choices, cost)
    dense_us = semantics.dense_us(state.site, cost, state.opt.block_m, state.opt.block_n)
    if planned >= dense_us:
        return dense_choices(state), (f"predicted slower than dense: {planned:.1f} us vs {dense_us:.1f} us "
                                      f"({overhead_basis(state, choices, cost)})")
    return choices, None


@dataclass(frozen=True)
class SiteDecision:
    """What the search chose for one site (and step range): the heads' choices, and why the site
    stays dense when it does (None when some head is sparse or quantized)."""

    choices: list[HeadChoice]
    dense_reason: str | None = None


def decide(states: dict, cost: CostModel, budget: Budget,
           weights: dict[tuple[str, int], float] | None = None) -> dict[tuple[str, int], SiteDecision]:
    """The search's decision per (site, step range) under one budget (not a QualityFloor, which
    bisects SiteErrorBudgets): every site within its error (SiteErrorBudget), or least (weighted)
    error under the model-wide density (DensityBudget) or predicted time (SpeedupBudget)."""
    if isinstance(budget, SiteErrorBudget):
        out = {}
        for key, st in states.items():
            choices, why = never_slower(st, fastest_within_error(st, cost, budget.max_rel_l2), cost)
            out[key] = SiteDecision(choices, why or _dense_reason(
                st, choices, f"nothing faster than dense keeps it within {budget_text(budget)}"))
        return out
    keys = list(states)
    w = None if weights is None else [weights[k] for k in keys]
    why = f"the model-wide search ({budget_text(budget)}) kept every head dense"
    if isinstance(budget, SpeedupBudget):
        picked = search_time([states[k] for k in keys], cost, budget.speedup, budget.quant, w)
        out = {}
        for k, ch in zip(keys, picked):  # a site slower than dense only adds time (and error)
            ch, slower = never_slower(states[k], ch, cost)
            out[k] = SiteDecision(ch, slower or _dense_reason(states[k], ch, why))
        return out
    if isinstance(budget, DensityBudget):  # asks for a density: kept even where slower (the table says so)
        picked = search_density([states[k] for k in keys], cost, budget.density, budget.quant, w)
        return {k: SiteDecision(ch, _dense_reason(states[k], ch, why)) for k, ch in zip(keys, picked)}
    raise ConfigError(f"decide: no search for the budget {budget!r}")


def _dense_reason(state: SiteState, choices: list[HeadChoice], why: str) -> str | None:
    return why if is_dense(state, choices) else None


def _error_factors(states: Sequence[SiteState], error_weights: Sequence[float] | None, who: str) -> list[float]:
    factors = [1.0] * len(states) if error_weights is None else [float(w) for w in error_weights]
    if len(factors) != len(states) or not all(w >= 0 for w in factors):
        raise ConfigError(f"{who}: need one non-negative error weight per site, got {error_weights}")
    return factors


def _unrecast(full: Sequence[Options], chosen: Sequence[list[HeadChoice]]) -> list[list[HeadChoice]]:
    """The original options (errors in their units, marginal times) of recast choices."""
    return [[next(o for o in opts if o.candidate == ch.candidate) for opts, ch in zip(site_full, site_chosen)]
            for site_full, site_chosen in zip(full, chosen)]


def search_density(states: Sequence[SiteState], cost: CostModel, density: float, quant: Quant,
                   error_weights: Sequence[float] | None = None) -> list[list[HeadChoice]]:
    """Least summed relative squared error over sites with overall block density <= density;
    with error_weights (one per state), the sum of weight * relative squared error. A state whose
    step range runs several denoising steps (SiteState.steps) counts its blocks and error once
    per step."""
    factors = _error_factors(states, error_weights, "search_density")
    all_options = [head_options(s, cost, (quant,)) for s in states]
    # recast each option: "time" = blocks it keeps, error relative to its site's norm, weighted
    # a state whose step range runs n steps spends n times its blocks and makes n times its error
    recast, sizes = [], []
    for opts_site, f, s in zip(all_options, factors, states):
        norm, n = float(s.norm2.sum()), s.steps
        qb, kb = s.blocks
        for opts in opts_site:
            recast.append([HeadChoice(o.candidate, o.quant, n * f * o.err2 / norm, n * o.density * qb * kb, o.density)
                           for o in opts])
            sizes.append(n * qb * kb)
    total = sum(sizes)

    def pick(mu):  # minimize err + mu * blocks
        return [min(opts, key=lambda o: (o.err2 + mu * o.time_us / total, o.time_us)) for opts in recast]

    limit = density * total + 1e-9
    best, ok = bisect_price(pick, lambda ch: sum(o.time_us for o in ch) <= limit)
    if ok:
        best = _spend_blocks(recast, best, limit)
    chosen, i = [], 0
    for opts_site in all_options:
        chosen.append(best[i:i + len(opts_site)])
        i += len(opts_site)
    return _unrecast(all_options, chosen)


def _spend_blocks(options: Options, choice: list[HeadChoice], limit: float) -> list[HeadChoice]:
    """Greedy finish of the density relaxation, which keeps only the options on each head's lower
    convex hull of (blocks, error) and so may leave blocks of the budget unused: the single-head
    move that cuts the most (weighted) error per block added, or any error cut that adds no block,
    while the blocks stay within `limit`. Recast options: time_us = blocks."""
    def error_cut_per_block(cur: HeadChoice, o: HeadChoice) -> tuple[float, float] | None:
        gain, extra = cur.err2 - o.err2, o.time_us - cur.time_us
        if gain <= 1e-15 * max(cur.err2, 1e-300):
            return None
        return (float("inf"), gain) if extra <= 0 else (gain / extra, gain)

    return _greedy_moves(options, choice, limit, lambda o: o.time_us, error_cut_per_block)


def _site_variants(state: SiteState, options: Options) -> list[Options]:
    """The per-head options of a site restricted by which fixed per-site costs it may pay: with or
    without dynamic heads (mask scoring), with or without permuted heads. Dense and skip stay in
    every variant. A Lagrangian over per-head marginal times cannot see a fixed cost; picking the
    best variant per site by its full predicted time can."""
    cands = state.candidates

    def permuted(h, o):
        c = cands[o.candidate]
        return (state.head_orders[h] is not state.own_order and not c.model_order
                and c.sparsity not in (Sparsity.DENSE, Sparsity.SKIP))

    online = (Sparsity.DYNAMIC, Sparsity.CLUSTER)  # heads that pay a per-site scoring cost
    has_dyn = any(cands[o.candidate].sparsity in online for opts in options for o in opts)
    has_perm = any(permuted(h, o) for h, opts in enumerate(options) for o in opts)
    variants = []
    for dyn in ((False, True) if has_dyn else (False,)):
        for perm in ((False, True) if has_perm else (False,)):
            variants.append([[o for o in opts if (dyn or cands[o.candidate].sparsity not in online)
                              and (perm or not permuted(h, o))] for h, opts in enumerate(options)])
    return variants


def search_time(states: Sequence[SiteState], cost: CostModel, speedup: float, quant: Quant,
                error_weights: Sequence[float] | None = None) -> list[list[HeadChoice]]:
    """Least summed (weighted) relative squared error over sites whose predicted attention time,
    summed over the sites (cost model, fixed per-site costs included; a state's time and error
    once per denoising step of its range, SiteState.steps), is at most the dense time / speedup.

    Lagrangian: for a price mu on time, each site takes, over its variants (_site_variants), the
    per-head minimizers of err + mu * marginal time, and keeps the variant minimizing its error +
    mu * full predicted site time; mu is bisected to the cheapest price that fits. A greedy pass
    then spends the time left over on the moves that cut the most error per microsecond. If even
    the fastest choice does not fit (no skip candidates), the fastest is returned."""
    factors = _error_factors(states, error_weights, "search_time")
    sites, full = [], []  # per state: variants of the recast options; the original options
    for st, f in zip(states, factors):  # a range of n steps: n times its time and error
        norm, n = max(float(st.norm2.sum()), 1e-300), st.steps
        full.append(head_options(st, cost, (quant,)))
        opts = [[HeadChoice(o.candidate, o.quant, n * f * o.err2 / norm, n * o.time_us, o.density)
                 for o in per_head] for per_head in full[-1]]
        sites.append(_site_variants(st, opts))
    dense_total = sum(st.steps * predicted_time_us(st, dense_choices(st), cost) for st in states)
    limit = dense_total / speedup

    def site_pick(i, mu):
        # the site left dense (every head's dense option) costs no lowering overhead, which
        # per-head minimizers cannot see: it is a choice of its own
        best = None
        dense = [next(o for o in opts if states[i].candidates[o.candidate].sparsity is Sparsity.DENSE)
                 for opts in sites[i][0]]
        for variant in [*sites[i], [[o] for o in dense]]:
            ch = [min(opts, key=lambda o: (o.err2 + mu * o.time_us, o.time_us)) for opts in variant]
            t = states[i].steps * site_time_us(states[i], ch, cost)
            obj = sum(o.err2 for o in ch) + mu * t
            if best is None or obj < best[0]:
                best = (obj, t, ch)
        return best[1], best[2]

    def pick(mu):  # (total time, choices per site, time per site)
        picked = [site_pick(i, mu) for i in range(len(states))]
        return sum(t for t, _ in picked), [ch for _, ch in picked], [t for t, _ in picked]

    # mu in units of 1 / dense_total (errors are relative, ~1)
    (_, best, times), ok = bisect_price(pick, lambda r: r[0] <= limit + 1e-9, scale=dense_total)
    if ok:
        best, times = _spend_time(states, sites, best, times, limit, cost)
    return _unrecast(full, best)


def _spend_time(states, sites, best, times, limit: float, cost: CostModel):
    """Greedy finish of search_time: repeatedly take the single-head move (within the site's
    allowed options) that cuts the most error per microsecond added (or any error cut that saves
    time), while the total predicted time stays within `limit`."""
    best = [list(ch) for ch in best]
    times = list(times)
    allowed = [[{o.candidate: o for v in variants for o in v[h]} for h in range(len(best[i]))]
               for i, variants in enumerate(sites)]
    for _ in range(10_000):
        total = sum(times)
        move = None
        for i in range(len(sites)):
            for h, cur in enumerate(best[i]):
                for o in allowed[i][h].values():
                    gain = cur.err2 - o.err2
                    if gain <= 1e-15:
                        continue
                    trial = best[i][:h] + [o] + best[i][h + 1:]
                    t = states[i].steps * site_time_us(states[i], trial, cost)
                    if total - times[i] + t > limit + 1e-9:
                        continue
                    score = gain / max(t - times[i], 1e-9)
                    if move is None or score > move[0]:
                        move = (score, i, h, o, t)
        if move is None:
            break
        _, i, h, o, t = move
        best[i][h] = o
        times[i] = t
    return best, times
