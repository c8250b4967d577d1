"""What the calibration search may choose from, and how it measures (CalibrationOptions)."""
from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass

from vsopt.core.costmodel import CostModel
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import FrameTiles, LocalWindow, Pattern, Radial, TemporalDiagonals, Union, VerticalStripes
from vsopt.core.plan import Quant


def default_patterns(grid: TokenGrid) -> tuple[Pattern, ...]:
    """The static pattern family tried for a grid: 3D windows, temporal diagonals, radial, frame
    tiles and a window with a first-frame sink (Sparse-vDiT's mix); sized from the grid."""
    F, H, W = grid.frames, grid.height, grid.width
    half = max(1, max(H, W) // 4)
    return (LocalWindow(1, 1, 1), LocalWindow(1, half, half), LocalWindow(2, 2 * half, 2 * half),
            LocalWindow(0, H, W), TemporalDiagonals(0), TemporalDiagonals(1), Radial(2 * half, 1),
            FrameTiles(2), Union((LocalWindow(1, half, half), VerticalStripes((0,)))))


@dataclass(frozen=True)
class CalibrationOptions:
    """What the search may choose from, and how it measures.

    block_m, block_n: kernel block sizes (masks are in blocks of these).
    orders: token orders tried per head (a site without a grid stays in FHW).
    order_density: density at which orders are compared (mass kept by the top blocks).
    mass_shares: calibrated-mask candidates, each the fewest blocks holding that share of mass.
    quants: precisions the search may pick. patterns / dynamic / skip: candidate families allowed.
    dynamic_values: cumulative-mass targets of the dynamic candidates.
    dynamic_top_k: fractions of key blocks per query row of the top-k dynamic candidates (in the
      head's order; an input-dependent mask at a fixed density).
    error_inputs: how many calibration inputs (the first ones) pass 2 runs on (None: all).
    site_overhead_us: what lowering a site costs beyond the GPU time the cost model predicts
      (host-side launch work, permutations, head-group gathers); with a SiteErrorBudget a site
      whose predicted saving is smaller stays dense. 0 by default; see docs/CALIBRATION.md for
      a measured value.
    step_ranges: [(start, stop)] of denoising steps calibrated separately (inputs must be
      RecordedCalls whose index is the step; stop None = to the end); None: one plan for all.
    cost_model: None = the shipped one for this GPU (CostModel.default).
    error_weights: site_id -> {denoising step: weight}, how much a unit of the site's relative
      squared error at that step costs in the final output (vsopt.calibration.sensitivity.
      euler_sensitivity); a DensityBudget or SpeedupBudget then minimizes the weighted sum (a step
      range takes the mean weight of its calibration steps). None: every site and step weighs 1.
    model_order_candidates: also offer every sparse candidate in the model's own token order
      (no permutation) to heads that were given another order, so that a time-budgeted search can
      drop a permutation that costs more than it saves (pass 2 then measures up to twice as many
      candidates). Off by default.
    """

    block_m: int = 64
    block_n: int = 64
    orders: tuple[TokenOrder, ...] = tuple(TokenOrder)
    order_density: float = 0.2
    mass_shares: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
    quants: tuple[Quant, ...] = tuple(Quant)
    patterns: bool = True
    dynamic: bool = True
    dynamic_values: tuple[float, ...] = (0.9, 0.95, 0.99)
    dynamic_top_k: tuple[float, ...] = ()
    skip: bool = True
    error_inputs: int | None = None
    site_overhead_us: float = 0.0
    step_ranges: tuple[tuple[int, int | None], ...] | None = None
    cost_model: CostModel | None = None
    error_weights: dict[str, dict[int, float]] | None = None
    model_order_candidates: bool = False

    def __post_init__(self):
        object.__setattr__(self, "orders", tuple(TokenOrder(o) for o in self.orders))
        object.__setattr__(self, "quants", tuple(Quant(q) for q in self.quants))
        if TokenOrder.FHW not in self.orders:
            raise ConfigError("CalibrationOptions.orders must include FHW (the model's own order)")
        if Quant.NONE not in self.quants:
            raise ConfigError("CalibrationOptions.quants must include Quant.NONE (the exact fallback)")
        if not all(0.0 < s <= 1.0 for s in self.mass_shares):
            raise ConfigError(f"mass_shares must lie in (0, 1], got {self.mass_shares}")
        if self.step_ranges is not None:
            object.__setattr__(self, "step_ranges", tuple((int(a), None if b is None else int(b))
                                                          for a, b in self.step_ranges))

    def fingerprint(self) -> dict:
        """The options as JSON (the cost model left out): recorded in the plan, and part of the
        checkpoint's fingerprint."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cost_model"}
        return json.loads(json.dumps(d, default=lambda v: v.value if isinstance(v, enum.Enum) else str(v)))
