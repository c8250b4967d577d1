"""What a calibration returns: the plan, and per site what was predicted and measured
(CalibrationResult, SiteResult); assemble() turns the search's choices into both."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from vsopt.calibration.budgets import Budget, budget_text
from vsopt.calibration.choices import head_plans, lowering_overhead_us, site_time_us
from vsopt.calibration.options import CalibrationOptions
from vsopt.core import semantics
from vsopt.core.costmodel import CostModel
from vsopt.core.ir import AttentionSite
from vsopt.core.plan import HeadPlan, Plan, SitePlan, StepPlan
from vsopt.core.pooled import Remainder


@dataclass
class SiteResult:
    site_id: str
    steps: tuple[int, int | None] | None
    predicted_rel_l2: float
    actual_rel_l2: float | None
    density: float
    predicted_us: float  # the cost model's time of the site as lowered, plus overhead_us
    dense_us: float
    choices: list[str]  # per head: "<candidate label>/<quant>/<order>"
    dense_reason: str | None = None  # why the search kept every head dense (None: some head is not)
    overhead_us: float = 0.0  # what lowering the site costs beyond the cost model (choices.lowering_overhead_us)
    step_count: int = 1  # denoising steps its step range runs (calibration inputs): what a model-wide budget counts


@dataclass
class CalibrationResult:
    """The plan, and per site what the calibration predicted and measured."""

    plan: Plan
    sites: list[SiteResult]
    left_dense: dict[str, str]  # site_id -> why it was not calibrated (a dense entry in the plan)
    budget: str
    quality: float | None = None  # QualityFloor: the held-out score reached

    @property
    def density(self) -> float:
        """Block density over all calibrated heads and the steps they run (dynamic heads at their
        measured density): each site's step range weighs as many steps as it runs, as
        DensityBudget counts it (a range of 16 steps spends 16 times the blocks of one step)."""
        return sum(s.density * s.step_count for s in self.sites) / max(1, sum(s.step_count for s in self.sites))

    def per_step_us(self, field: str) -> float:
        """A SiteResult time field ("predicted_us", "dense_us", "overhead_us") for one denoising
        step averaged over the steps, summed over the calibrated sites: each step range weighs the
        steps it runs (without step ranges, the plain sum)."""
        steps = sum(s.step_count for s in self.sites) / max(1, len({s.site_id for s in self.sites}))
        return sum(getattr(s, field) * s.step_count for s in self.sites) / max(steps, 1e-9)

    def table(self) -> str:
        lines = [f"budget: {self.budget}",
                 f"{'site':<28} {'steps':<9} {'pred err':>9} {'actual':>9} {'density':>8} {'pred ms':>8} {'dense ms':>8}"]
        for s in self.sites:
            steps = "all" if s.steps is None else _steps_text(s.steps)
            actual = "-" if s.actual_rel_l2 is None else f"{s.actual_rel_l2:.4f}"
            lines.append(f"{s.site_id:<28} {steps:<9} {s.predicted_rel_l2:>9.4f} {actual:>9} {s.density:>8.3f} "
                         f"{s.predicted_us / 1e3:>8.3f} {s.dense_us / 1e3:>8.3f}")
        pred, dense, overhead = (self.per_step_us(f) for f in ("predicted_us", "dense_us", "overhead_us"))
        per_step = any(s.step_count > 1 for s in self.sites)
        lines.append(f"overall density {self.density:.3f}{' over the steps' if per_step else ''}; predicted attention "
                     f"time {pred / 1e3:.3f} ms vs dense {dense / 1e3:.3f} ms ({dense / max(pred, 1e-9):.2f}x)"
                     f"{' per step' if per_step else ''}")
        if overhead:
            lines.append(f"  of which lowering overhead beyond the cost model: {overhead / 1e3:.3f} ms")
        if self.quality is not None:
            lines.append(f"held-out quality: {self.quality:.4g}")
        for s in self.sites:
            where = s.site_id + ("" if s.steps is None else " at steps " + _steps_text(s.steps))
            if s.dense_reason:
                lines.append(f"kept dense: {where}: {s.dense_reason}")
            elif s.predicted_us >= s.dense_us:  # only a DensityBudget keeps such a site: it asks for density
                lines.append(f"predicted slower than dense, kept for the budget: {where}: {s.predicted_us:.1f} us "
                             f"vs {s.dense_us:.1f} us")
        for sid, why in self.left_dense.items():
            lines.append(f"left dense: {sid}: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"budget": self.budget, "density": self.density, "quality": self.quality,
                "sites": [dataclasses.asdict(s) for s in self.sites], "left_dense": self.left_dense}


def _steps_text(steps: tuple[int, int | None]) -> str:
    return f"{steps[0]}:{'' if steps[1] is None else steps[1]}"


def assemble(states: dict, decisions: dict, options: CalibrationOptions, cost: CostModel, budget: Budget,
             uncalibrated: Sequence[tuple[AttentionSite, str]] = ()) -> tuple[Plan, list[SiteResult]]:
    """The plan and the per-site predictions for one set of decisions (search.SiteDecision).
    states, decisions: keyed by (site_id, step range index). uncalibrated: the sites calibration
    left alone, each with its reason.

    Every site the calibration kept dense (uncalibrated, or dense in every step range) gets a
    dense entry, "dense on purpose" (SitePlan.is_dense: strict mode accepts it), with its reason
    in plan.meta["dense_reasons"][site_id]; a step range kept dense in a site that is sparse in
    another is listed as "<site_id>@<first step>"."""
    site_plans, results, reasons = {}, [], {}
    ranges = options.step_ranges
    by_site: dict[str, list[tuple[int, tuple[HeadPlan, ...], str | None]]] = {}
    for (sid, r), st in states.items():
        decision = decisions[(sid, r)]
        ch = decision.choices
        heads = head_plans(st, ch)
        by_site.setdefault(sid, []).append((r, heads, decision.dense_reason))
        results.append(SiteResult(
            sid, None if ranges is None else ranges[r],
            predicted_rel_l2=math.sqrt(sum(c.err2 for c in ch) / max(float(st.norm2.sum()), 1e-300)),
            actual_rel_l2=None, density=sum(c.density for c in ch) / len(ch),
            predicted_us=site_time_us(st, ch, cost), overhead_us=lowering_overhead_us(st, ch, cost),
            dense_us=semantics.dense_us(st.site, cost, options.block_m, options.block_n),
            choices=[f"{st.candidates[c.candidate].label}/{c.quant.value}/{hp.order.value}" for c, hp in zip(ch, heads)],
            dense_reason=decision.dense_reason, step_count=st.steps))
    dense_head = HeadPlan(block_m=options.block_m, block_n=options.block_n)
    for sid, entries in by_site.items():
        site = states[(sid, entries[0][0])].site
        why = [(r, w) for r, _, w in entries if w]
        if len(why) == len(entries):  # dense at every step: one dense entry
            site_plans[sid] = SitePlan.for_site(site, dense_head)
            texts = sorted({w for _, w in why})
            reasons[sid] = texts[0] if len(texts) == 1 else "; ".join(
                f"steps {_steps_text(ranges[r])}: {w}" for r, w in why)
            continue
        for r, w in why:
            reasons[f"{sid}@{ranges[r][0]}"] = w
        if ranges is None:
            site_plans[sid] = SitePlan.for_site(site, entries[0][1])
        else:
            # the earliest calibrated range (usually the densest) also serves steps no range covers
            steps = [StepPlan(ranges[r][0], ranges[r][1], heads) for r, heads, _ in entries]
            site_plans[sid] = SitePlan.for_site(site, entries[0][1], steps)
    for site, why in uncalibrated:
        site_plans[site.site_id] = SitePlan.for_site(site, dense_head)
        reasons[site.site_id] = why
    meta = {"calibration": {"budget": budget_text(budget), "options": options.fingerprint(), "cost_model": cost.gpu,
                            "predicted": {r.site_id + ("" if r.steps is None else f"@{r.steps[0]}"): r.predicted_rel_l2
                                          for r in results}}}
    if reasons:
        meta["dense_reasons"] = reasons
    # the pooled remainder and the corrections' epilogues priced by defaults, not fitted: say which
    extra = any(hp.remainder is Remainder.POOLED or hp.renorm is not None
                for sp in site_plans.values() for hp in sp.all_heads())
    defaulted = cost.defaulted_prices(cudagraphs=not options.host_overhead) if extra else []
    if defaulted:
        meta["calibration"]["defaulted_prices"] = defaulted
    return Plan(site_plans, meta), results
