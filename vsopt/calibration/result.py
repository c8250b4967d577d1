"""What a calibration returns: the plan, and per site what was predicted and measured
(CalibrationResult, SiteResult); assemble() turns the search's choices into both."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from vsopt.calibration.budgets import Budget, budget_text
from vsopt.calibration.choices import head_plans, predicted_time_us
from vsopt.calibration.options import CalibrationOptions
from vsopt.core import semantics
from vsopt.core.costmodel import CostModel
from vsopt.core.plan import HeadPlan, Plan, SitePlan, StepPlan


@dataclass
class SiteResult:
    site_id: str
    steps: tuple[int, int | None] | None
    predicted_rel_l2: float
    actual_rel_l2: float | None
    density: float
    predicted_us: float
    dense_us: float
    choices: list[str]  # per head: "<candidate label>/<quant>/<order>"


@dataclass
class CalibrationResult:
    """The plan, and per site what the calibration predicted and measured."""

    plan: Plan
    sites: list[SiteResult]
    left_dense: dict[str, str]  # site_id -> why it was not calibrated
    budget: str
    quality: float | None = None  # QualityFloor: the held-out score reached

    @property
    def density(self) -> float:
        """Block density over all calibrated heads (dynamic heads at their measured density)."""
        return sum(s.density for s in self.sites) / max(1, len(self.sites))

    def table(self) -> str:
        lines = [f"budget: {self.budget}",
                 f"{'site':<28} {'steps':<9} {'pred err':>9} {'actual':>9} {'density':>8} {'pred ms':>8} {'dense ms':>8}"]
        for s in self.sites:
            steps = "all" if s.steps is None else f"{s.steps[0]}:{'' if s.steps[1] is None else s.steps[1]}"
            actual = "-" if s.actual_rel_l2 is None else f"{s.actual_rel_l2:.4f}"
            lines.append(f"{s.site_id:<28} {steps:<9} {s.predicted_rel_l2:>9.4f} {actual:>9} {s.density:>8.3f} "
                         f"{s.predicted_us / 1e3:>8.3f} {s.dense_us / 1e3:>8.3f}")
        pred = sum(s.predicted_us for s in self.sites)
        dense = sum(s.dense_us for s in self.sites)
        lines.append(f"overall density {self.density:.3f}; predicted attention time {pred / 1e3:.3f} ms vs dense "
                     f"{dense / 1e3:.3f} ms ({dense / max(pred, 1e-9):.2f}x)")
        if self.quality is not None:
            lines.append(f"held-out quality: {self.quality:.4g}")
        for sid, why in self.left_dense.items():
            lines.append(f"left dense: {sid}: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"budget": self.budget, "density": self.density, "quality": self.quality,
                "sites": [dataclasses.asdict(s) for s in self.sites], "left_dense": self.left_dense}


def assemble(states: dict, choices: dict, options: CalibrationOptions, cost: CostModel,
             budget: Budget) -> tuple[Plan, list[SiteResult]]:
    """The plan and the per-site predictions for one set of choices. states, choices: keyed by
    (site_id, step range index)."""
    site_plans, results = {}, []
    ranges = options.step_ranges
    by_site: dict[str, list[tuple[int, tuple[HeadPlan, ...]]]] = {}
    for (sid, r), st in states.items():
        ch = choices[(sid, r)]
        heads = head_plans(st, ch)
        by_site.setdefault(sid, []).append((r, heads))
        results.append(SiteResult(
            sid, None if ranges is None else ranges[r],
            predicted_rel_l2=math.sqrt(sum(c.err2 for c in ch) / max(float(st.norm2.sum()), 1e-300)),
            actual_rel_l2=None, density=sum(c.density for c in ch) / len(ch),
            predicted_us=predicted_time_us(st, ch, cost),
            dense_us=semantics.dense_us(st.site, cost, options.block_m, options.block_n),
            choices=[f"{st.candidates[c.candidate].label}/{c.quant.value}/{hp.order.value}" for c, hp in zip(ch, heads)]))
    for sid, entries in by_site.items():
        site = states[(sid, entries[0][0])].site
        if ranges is None:
            site_plans[sid] = SitePlan.for_site(site, entries[0][1])
        else:
            # the earliest calibrated range (usually the densest) also serves steps no range covers
            steps = [StepPlan(ranges[r][0], ranges[r][1], heads) for r, heads in entries]
            site_plans[sid] = SitePlan.for_site(site, entries[0][1], steps)
    meta = {"calibration": {"budget": budget_text(budget), "options": options.fingerprint(), "cost_model": cost.gpu,
                            "predicted": {r.site_id + ("" if r.steps is None else f"@{r.steps[0]}"): r.predicted_rel_l2
                                          for r in results}}}
    return Plan(site_plans, meta), results
