"""Dense warm-up steps as a search choice (Sparse VideoGen, Radial Attention): the first k
denoising steps run every calibrated site dense, the rest sparse.

The early steps of a diffusion sampler lay out the clip's structure, and an error there is carried
through every later step; Sparse VideoGen and Radial Attention therefore run them dense. Here k is
a choice the search weighs against its cost: for each candidate k (CalibrationOptions.dense_warmup,
and 0), the step ranges below k are fixed dense (their blocks or time taken out of the budget)
and the remaining ranges are searched under what is left; the k whose plan has the least summed
(weighted) relative squared error, the objective the density and time searches minimize, wins.
A k whose warm-up alone spends the whole budget is infeasible.

Only the model-wide budgets trade steps against each other. Under a SiteErrorBudget each step
range meets its own error bound and a dense range only adds time, so k = 0; a QualityFloor
bisects SiteErrorBudgets and inherits that.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from vsopt.calibration.budgets import Budget, DensityBudget, SpeedupBudget
from vsopt.calibration.choices import dense_choices, predicted_time_us
from vsopt.calibration.search import SiteDecision, decide

Key = tuple[str, int]  # (site_id, step range index)


def warmup_keys(states: dict, ranges: Sequence[tuple[int, int | None]] | None, k: int) -> list[Key]:
    """The (site, range) states a warm-up of k steps runs dense: ranges that end at or before k."""
    if ranges is None or k == 0:
        return []
    return [key for key in states if ranges[key[1]][1] is not None and ranges[key[1]][1] <= k]


def objective(states: dict, decisions: dict[Key, SiteDecision], weights: dict[Key, float] | None) -> float:
    """The summed (weighted) relative squared error of the decisions, once per denoising step of
    each state's range: what the density and time searches minimize."""
    total = 0.0
    for key, d in decisions.items():
        norm = max(float(states[key].norm2.sum()), 1e-300)
        total += states[key].steps * (1.0 if weights is None else weights[key]) * sum(c.err2 for c in d.choices) / norm
    return total


def _rest_budget(states: dict, warm: list[Key], budget: Budget, cost) -> Budget | None:
    """The budget left for the ranges after a warm-up running `warm` dense, or None when the
    warm-up alone spends it all."""
    rest = [k for k in states if k not in warm]
    if isinstance(budget, DensityBudget):
        size = {k: states[k].steps * states[k].blocks[0] * states[k].blocks[1] for k in states}
        total, used = sum(size.values()), sum(size[k] for k in warm)
        left = budget.density * total - used
        if left <= 0:
            return None
        return dataclasses.replace(budget, density=min(1.0, left / sum(size[k] for k in rest)))
    if isinstance(budget, SpeedupBudget):
        dense = {k: states[k].steps * predicted_time_us(states[k], dense_choices(states[k]), cost) for k in states}
        left = sum(dense.values()) / budget.speedup - sum(dense[k] for k in warm)
        if left <= 0:
            return None
        return dataclasses.replace(budget, speedup=sum(dense[k] for k in rest) / left)
    return budget


def decide_at_warmup(states: dict, cost, budget: Budget, weights: dict[Key, float] | None,
                     ranges: Sequence[tuple[int, int | None]] | None, k: int) -> dict[Key, SiteDecision] | None:
    """search.decide with the first k steps' ranges dense and the rest searched under the budget
    they leave (None when the warm-up alone spends it)."""
    warm = warmup_keys(states, ranges, k)
    rest = {key: st for key, st in states.items() if key not in warm}
    rest_budget = _rest_budget(states, warm, budget, cost)
    if rest_budget is None or not rest:
        return None
    decisions = decide(rest, cost, rest_budget, None if weights is None else {key: weights[key] for key in rest})
    for key in warm:
        decisions[key] = SiteDecision(dense_choices(states[key]),
                                      f"dense warm-up: the first {k} step(s) dense, chosen by the search")
    return {key: decisions[key] for key in states}


def decide_with_warmup(states: dict, cost, budget: Budget, weights: dict[Key, float] | None,
                       ranges: Sequence[tuple[int, int | None]] | None, warmups: Sequence[int]
                       ) -> tuple[dict[Key, SiteDecision], dict]:
    """search.decide with the dense warm-up chosen too: (decisions, a record of the choice for
    JSON: {"chosen": k, "tried": {k: objective, or None when infeasible}})."""
    tried: dict[str, float | None] = {}
    best = None
    model_wide = isinstance(budget, (DensityBudget, SpeedupBudget))
    for k in (0, *(warmups if model_wide else ())):
        decisions = decide_at_warmup(states, cost, budget, weights, ranges, k)
        obj = None if decisions is None else objective(states, decisions, weights)
        tried[str(k)] = obj
        if obj is not None and (best is None or obj < best[0] - 1e-12 * max(1.0, abs(best[0]))):
            best = (obj, k, decisions)
    record = {"chosen": best[1], "tried": tried}
    if not model_wide and warmups:
        record["why"] = "a per-site error budget gains nothing from dense steps: no warm-up"
    return best[2], record
