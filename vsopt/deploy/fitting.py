"""A whole plan fitted to a model's sites: what the compile path does site by site (lower_plan
calls vsopt.core.resample.fit_site_plan), for the callers that check a plan before using it
(vsopt.export, `vsopt demo`): a plan calibrated at another clip size applies, with its density
change reported, instead of being rejected."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from vsopt.core.errors import PlanError
from vsopt.core.ir import AttentionSite
from vsopt.core.plan import Plan
from vsopt.core.resample import fit_site_plan


@dataclass(frozen=True)
class FittedPlan:
    """plan: every entry at its model site's size (entries for sites the model lacks are dropped:
    there are none, fit_plan raises); lines: one per entry fitted to another size (resample's
    words: the sizes and the density change), empty when the plan fits as it is."""

    plan: Plan
    lines: tuple[str, ...]

    @property
    def resampled(self) -> bool:
        return bool(self.lines)


def fit_plan(plan: Plan, sites: Iterable[AttentionSite]) -> FittedPlan:
    """`plan` fitted to the model's `sites`; PlanError listing what cannot be: plan sites the model
    does not have, entries fit_site_plan cannot map (another head count, a cross-attention's masks,
    no grid)."""
    model = {s.site_id: s for s in sites}
    problems = []
    missing = sorted(set(plan.sites) - set(model))
    if missing:
        problems.append(f"plan sites not in the model: {missing} (model sites: {sorted(model)})")
    fitted, lines = {}, []
    for sid, sp in plan.sites.items():
        if sid not in model:
            continue
        fit = fit_site_plan(sp, model[sid])
        if fit.plan is None:
            problems.append(fit.line())
            continue
        fitted[sid] = fit.plan
        if fit.resampled:
            lines.append(fit.line())
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PlanError(f"the plan does not fit this model: {problems[0]}{more}")
    return FittedPlan(Plan(fitted, plan.meta), tuple(lines))
