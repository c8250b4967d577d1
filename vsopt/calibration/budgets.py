"""What a calibration must achieve: the budgets the search meets.

    SiteErrorBudget(max_rel_l2)   every site within a relative L2 of exact attention
    DensityBudget(density)        at most this share of key blocks over the model, least error
    SpeedupBudget(speedup)        the cost model's time within dense / speedup, least error
    QualityFloor(held_out, value) the model output on a held-out input within a PSNR / rel. L2
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from vsopt.calibration.capture import RecordedCall
from vsopt.core.errors import ConfigError
from vsopt.core.plan import Quant


@dataclass(frozen=True)
class SiteErrorBudget:
    """Every site's output may differ from exact attention by at most `max_rel_l2` (relative L2,
    all heads of the site together, over the calibration inputs)."""

    max_rel_l2: float

    def __post_init__(self):
        if not 0.0 < self.max_rel_l2 < 1.0:
            raise ConfigError(f"SiteErrorBudget.max_rel_l2 must be in (0, 1), got {self.max_rel_l2}")


@dataclass(frozen=True)
class DensityBudget:
    """Keep at most `density` of all key blocks over the calibrated sites, placing them where they
    lose the least accuracy; every head runs in precision `quant`."""

    density: float
    quant: Quant = Quant.NONE

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"DensityBudget.density must be in (0, 1], got {self.density}")
        object.__setattr__(self, "quant", Quant(self.quant))


@dataclass(frozen=True)
class SpeedupBudget:
    """The plan's predicted attention time (cost model, summed over the calibrated sites and step
    ranges) is at most the dense attention's predicted time / `speedup`; the search minimizes the
    summed (weighted) relative squared error under that time, every head in precision `quant`.
    Fixed per-site costs (a launch per kernel configuration, dynamic-mask scoring, token
    permutations) are charged once per site, so a site drops dynamic heads or reorders when they
    cost more than they save, and so is what lowering costs beyond the cost model
    (CalibrationOptions.site_overhead_us, host_overhead): a site whose plan would be slower than
    dense stays dense. The time is the cost model's prediction (fitted on a GPU), not a
    measurement."""

    speedup: float
    quant: Quant = Quant.NONE

    def __post_init__(self):
        if not (self.speedup > 0.0 and math.isfinite(self.speedup)):
            raise ConfigError(f"SpeedupBudget.speedup must be a finite number > 0, got {self.speedup}")
        object.__setattr__(self, "quant", Quant(self.quant))


class QualityMetric(str, enum.Enum):
    PSNR = "psnr"  # dB of the model output against the dense model's, higher is better
    REL_L2 = "rel_l2"  # relative L2 of the model output, lower is better


@dataclass(frozen=True)
class QualityFloor:
    """The model output on `held_out` (a tuple of positional inputs or a RecordedCall, not among the
    calibration inputs) must reach `value` in `metric` against the dense model (PSNR >= value, or
    relative L2 <= value). Found by bisection over a per-site error budget; each step runs the
    model once."""

    held_out: Any
    value: float
    metric: QualityMetric = QualityMetric.PSNR
    iterations: int = 6

    def __post_init__(self):
        if not isinstance(self.held_out, RecordedCall):
            object.__setattr__(self, "held_out", tuple(self.held_out))
        object.__setattr__(self, "metric", QualityMetric(self.metric))
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value)):
            raise ConfigError(f"QualityFloor.value must be a finite number, got {self.value!r}")
        if self.metric is QualityMetric.REL_L2 and not self.value > 0:
            raise ConfigError(f"QualityFloor.value must be > 0 for a relative L2 floor, got {self.value!r}")
        if not (isinstance(self.iterations, int) and self.iterations >= 1):
            raise ConfigError(f"QualityFloor.iterations must be an integer >= 1, got {self.iterations!r}")

    def passes(self, score: float) -> bool:
        return score >= self.value if self.metric is QualityMetric.PSNR else score <= self.value


Budget = SiteErrorBudget | DensityBudget | SpeedupBudget | QualityFloor
BUDGET_TYPES = (SiteErrorBudget, DensityBudget, SpeedupBudget, QualityFloor)


def budget_text(budget: Budget) -> str:
    """One line saying what the budget asks, for tables and the plan's metadata."""
    if isinstance(budget, SiteErrorBudget):
        return f"per-site relative L2 <= {budget.max_rel_l2:g}"
    if isinstance(budget, DensityBudget):
        return f"overall density <= {budget.density:g}, quant {budget.quant.value}"
    if isinstance(budget, SpeedupBudget):
        return f"predicted attention speedup >= {budget.speedup:g}x (cost model), quant {budget.quant.value}"
    op = ">=" if budget.metric is QualityMetric.PSNR else "<="
    return f"held-out {budget.metric.value} {op} {budget.value:g}"
