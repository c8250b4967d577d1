"""What the calibration search may choose from, and how it measures (CalibrationOptions)."""
from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass

from vsopt.calibration.clusters import check_clusters
from vsopt.core.clustering import ClusterSpec
from vsopt.core.costmodel import CostModel
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import FrameTiles, LocalWindow, Pattern, Radial, TemporalDiagonals, Union, VerticalStripes
from vsopt.core.plan import Quant, is_block_size


def default_patterns(grid: TokenGrid) -> tuple[Pattern, ...]:
    """The static pattern family tried for a grid: 3D windows, temporal diagonals, radial, frame
    tiles and a window with a first-frame sink (Sparse-vDiT's mix); sized from the grid."""
    F, H, W = grid.frames, grid.height, grid.width
    half = max(1, max(H, W) // 4)
    return (LocalWindow(1, 1, 1), LocalWindow(1, half, half), LocalWindow(2, 2 * half, 2 * half),
            LocalWindow(0, H, W), TemporalDiagonals(0), TemporalDiagonals(1), Radial(2 * half, 1),
            FrameTiles(2), Union((LocalWindow(1, half, half), VerticalStripes((0,)))))


def check_block_size(value, name: str) -> int:
    """value, when the kernels take it as a block size (vsopt.core.plan.is_block_size); else a
    ConfigError naming `name` (an option or a field)."""
    if not is_block_size(value):
        raise ConfigError(f"{name} {value!r}: a block size must be a power of two from 16 to 256")
    return value


def check_device(device: str, name: str = "--device"):
    """The torch.device `device` names, when this machine has it; else a ConfigError naming
    `name`, in one line (a CUDA device where no CUDA GPU is available is refused here, not when
    the model is moved)."""
    import torch

    from vsopt.calibration.failures import one_line

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{name} {device!r}: {one_line(e)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{name} {device!r}: no CUDA GPU is available here")
    return dev


def check_overhead(value, name: str) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} {value!r}: must be a finite number of microseconds >= 0")
    return float(value)


def check_cost_model_blocks(cost: CostModel, quants, block: int, name: str, source: str) -> None:
    """A ConfigError naming `name` when the cost model (described by `source`) has no timings for
    block x block blocks in one of these precisions (it scales head dims, not block sizes)."""
    measured = {(k.split("/")[0], k.split("/")[2]) for k in cost.launch_us}
    missing = [Quant(q).value for q in quants if (Quant(q).value, f"{block}x{block}") not in measured]
    if missing:
        blocks = sorted({b for _, b in measured}, key=lambda b: int(b.split("x")[0]))
        raise ConfigError(f"{name} {block}: {source} has no timings for {block}x{block} blocks in "
                          f"{', '.join(missing)} (it has {', '.join(blocks)})")


def check_step_ranges(ranges, name: str) -> tuple[tuple[int, int | None], ...]:
    """Denoising step ranges [(start, stop)] as calibration takes them: non-empty, start >= 0,
    stop None (to the end) or > start, no two overlapping; else a ConfigError naming `name`."""
    try:
        out = tuple((int(a), None if b is None else int(b)) for a, b in ranges)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected (start, stop) pairs of integers, got {ranges!r}") from None
    if not out:
        raise ConfigError(f"{name}: no step range given")
    for a, b in out:
        if a < 0 or (b is not None and b <= a):
            raise ConfigError(f"{name}: {a}:{'' if b is None else b} is empty or negative (need 0 <= start < stop)")
    ordered = sorted(out)
    for (a, b), (c, d) in zip(ordered, ordered[1:]):
        if b is None or b > c:
            raise ConfigError(f"{name}: {a}:{'' if b is None else b} and {c}:{'' if d is None else d} overlap")
    return out


def _positive_ints(values, name: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted(set(values)))
    except TypeError:
        raise ConfigError(f"{name}: expected a list of integers, got {values!r}") from None
    bad = [v for v in out if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise ConfigError(f"{name}: {bad[0]!r} is not an integer >= 1")
    return out


def check_warmup(values, ranges) -> tuple[int, ...]:
    """Dense warm-up candidates: integers k >= 1, each the end of step ranges that cover steps
    0 .. k - 1 without a gap (the warm-up runs whole ranges dense); else a ConfigError."""
    ks = _positive_ints(values, "CalibrationOptions.dense_warmup")
    if ks and ranges is None:
        raise ConfigError("CalibrationOptions.dense_warmup needs step_ranges (the warm-up is whole step ranges)")
    for k in ks:
        at = 0
        for a, b in sorted(ranges):
            if a != at or b is None or at >= k:
                break
            at = b
        if at != k:
            raise ConfigError(f"CalibrationOptions.dense_warmup {k}: the step ranges {list(ranges)} do not cover "
                              f"steps 0..{k - 1} exactly (need ranges from 0 without a gap, one ending at {k})")
    return ks


def check_refresh(values, ranges) -> tuple[int, ...]:
    """Mask refresh intervals r >= 2 (r = 1 is recomputing every step, the plain candidate)."""
    rs = _positive_ints(values, "CalibrationOptions.mask_refresh")
    if rs and rs[0] < 2:
        raise ConfigError("CalibrationOptions.mask_refresh: 1 is recomputing at every step (the plain dynamic "
                          "candidate); give intervals >= 2")
    return rs


def check_renorm(values, name: str = "renorm_every") -> tuple[int, ...]:
    """Renorm (or residual sharing) intervals r >= 2 (r = 1 would measure, at full cost, at every step)."""
    rs = _positive_ints(values, f"CalibrationOptions.{name}")
    if rs and rs[0] < 2:
        raise ConfigError(f"CalibrationOptions.{name}: 1 measures at every step (dense work); give intervals >= 2")
    return rs


@dataclass(frozen=True)
class CalibrationOptions:
    """What the search may choose from, and how it measures.

    block_m, block_n: kernel block sizes (masks are in blocks of these).
    orders: token orders tried per head besides the model's own (orders.model_order(grid): FHW for
    frame-major tokens), which is always tried and wins ties (a site without a grid stays in FHW).
    order_density: density at which orders are compared (mass kept by the top blocks).
    mass_shares: calibrated-mask candidates, each the fewest blocks holding that share of mass.
    quants: precisions the search may pick. patterns / dynamic / skip: candidate families allowed.
    dynamic_values: cumulative-mass targets of the dynamic candidates.
    dynamic_top_k: fractions of key blocks per query row of the top-k dynamic candidates (in the
      head's order; an input-dependent mask at a fixed density).
    error_inputs: how many calibration inputs (the first ones) pass 2 runs on (None: all).
    held_out_errors: pass 1 (block mass: orders and calibrated masks) runs on the first half of
      each step range's inputs and pass 2 (candidate errors) on the rest, so that a calibrated
      mask's error is measured on inputs it was not made from (a mask made from an input is that
      input's oracle: its error there is optimistic against a dynamic head's, which is predicted
      online). Needs two or more inputs per step range (e.g. two sampler runs). Off by default.
    site_overhead_us: what lowering a site costs beyond the GPU time the cost model predicts
      (host-side work of permutations and head-group gathers, for example), charged once to every
      site that is not left dense. 0 by default; see docs/CALIBRATION.md for measured values.
    host_overhead: also charge each lowered site, per kernel launch, the host's overhead of one
      call of that kernel configuration, as measured with the cost model (its meta
      "host_overhead_us_not_in_model": 150 to 470 us per launch on the H200; 0 where the cost
      model has no such measurement). That is what the plan costs when the GPU waits for the host,
      as with torch.compile(backend="vsopt") without CUDA graphs at small sizes. Off (the
      default): the cost model's GPU time alone, which is what a plan run under CUDA graphs
      costs (the cost model was fitted to CUDA-graph-replayed timings). `vsopt calibrate` turns it
      on unless --cuda-graphs.
      Whatever the overhead, a site whose plan is predicted no faster than dense stays dense
      (except under a DensityBudget, which asks for a density, not a speed), with the reason.
    step_ranges: [(start, stop)] of denoising steps calibrated separately (inputs must be
      RecordedCalls whose index is the step; stop None = to the end); None: one plan for all.
    cost_model: None = the shipped one for this GPU (CostModel.default).
    error_weights: site_id -> {denoising step: weight}, how much a unit of the site's relative
      squared error at that step costs in the final output (vsopt.calibration.sensitivity.
      euler_sensitivity); a DensityBudget or SpeedupBudget then minimizes the weighted sum (a step
      range takes the mean weight of its calibration steps). None: every site and step weighs 1.
    error_weights_probe: how error_weights were measured, as text (the probe head of
      sensitivity.sampler_sensitivity, sensitivity.probe_text: "top-k 0.5", "pooled top-k 0.3"):
      recorded in the plan beside them, not used by the search. None with error_weights None.
    dense_warmup: numbers k of first denoising steps the search may run dense (Sparse VideoGen,
      Radial Attention); 0 (no warm-up) is always tried too. Each k must end a run of step_ranges
      starting at step 0; under a DensityBudget or SpeedupBudget the warm-up's blocks or time are
      taken out of the budget and the k with the least (weighted) error wins
      (vsopt.calibration.warmup). Under other budgets warm-up buys no site error: k = 0.
    mask_refresh: refresh intervals r > 0 of reused dynamic masks (AdaSpa): every dynamic
      candidate is also offered with reuse_steps = r - 1, its mask computed at steps 0, r, 2r, ...
      and reused in between, counted from the first step of each step range (each range is its
      own lowered graph). Offered only where pass 2's inputs hold a step reusing a mask and the
      refresh step it reuses: consecutive steps of one sampler run (vsopt.calibration.reuse).
    pooled_remainder: also offer every mask, pattern and dynamic candidate with its dropped key
      blocks attended mean-pooled (PSA, vsopt.core.pooled; HeadPlan.remainder "pooled"): its error
      measured as it runs, its extra work priced by semantics.site_work (pass 2 then measures up
      to twice as many candidates). Off by default.
    renorm_every: intervals r >= 2 of the softmax-mass correction (Re-ttention,
      vsopt.calibration.renorm; HeadPlan.renorm): every mask, pattern and dynamic candidate (the
      pooled ones too) is also offered measuring its dropped blocks' statistics at steps 0, r, 2r,
      ... of each step range (exact attention there, at full cost) and correcting the steps
      between with them; its error measured as it runs, its work priced by semantics.site_work.
      Offered only where pass 2's inputs hold a correcting step and the measuring step it uses
      (consecutive steps of one sampler run). Off by default.
    residual_every: intervals r >= 2 of residual sharing (DiTFastAttn, vsopt.core.residual;
      HeadPlan.renorm with kind "residual"): every mask, pattern and dynamic candidate (the pooled
      ones too) is also offered running exactly at steps 0, r, 2r, ... of each step range (every
      block: dense work) and keeping its error there, R = exact - sparse, which the steps between
      add to their sparse output; measured as it runs, priced by semantics.site_work, offered where
      renorm_every's would be. Off by default.
    clusters: cluster candidates (Sparse VideoGen 2, vsopt.core.clustering; HeadPlan sparsity
      "cluster"): each ClusterSpec (query/key cluster counts, top-p, refresh period, k-means
      iterations) is offered to every head, its token order and blocks from k-means of its own
      queries and keys, measured across pass 2's steps as the runtime refreshes and warm-starts it
      (vsopt.calibration.clusters). Empty (none) by default.
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
    held_out_errors: bool = False
    site_overhead_us: float = 0.0
    host_overhead: bool = False
    step_ranges: tuple[tuple[int, int | None], ...] | None = None
    cost_model: CostModel | None = None
    error_weights: dict[str, dict[int, float]] | None = None
    error_weights_probe: str | None = None
    model_order_candidates: bool = False
    dense_warmup: tuple[int, ...] = ()
    mask_refresh: tuple[int, ...] = ()
    pooled_remainder: bool = False
    renorm_every: tuple[int, ...] = ()
    residual_every: tuple[int, ...] = ()
    clusters: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "orders", tuple(TokenOrder(o) for o in self.orders))
        object.__setattr__(self, "quants", tuple(Quant(q) for q in self.quants))
        if Quant.NONE not in self.quants:
            raise ConfigError("CalibrationOptions.quants must include Quant.NONE (the exact fallback)")
        if not all(0.0 < s <= 1.0 for s in self.mass_shares):
            raise ConfigError(f"mass_shares must lie in (0, 1], got {self.mass_shares}")
        for name in ("block_m", "block_n"):
            check_block_size(getattr(self, name), f"CalibrationOptions.{name}")
        if self.error_inputs is not None and not (isinstance(self.error_inputs, int) and self.error_inputs >= 1):
            raise ConfigError(f"CalibrationOptions.error_inputs must be None or an integer >= 1, got "
                              f"{self.error_inputs!r}")
        check_overhead(self.site_overhead_us, "CalibrationOptions.site_overhead_us")
        if self.step_ranges is not None:
            object.__setattr__(self, "step_ranges", check_step_ranges(self.step_ranges,
                                                                      "CalibrationOptions.step_ranges"))
        object.__setattr__(self, "dense_warmup", check_warmup(self.dense_warmup, self.step_ranges))
        object.__setattr__(self, "mask_refresh", check_refresh(self.mask_refresh, self.step_ranges))
        object.__setattr__(self, "renorm_every", check_renorm(self.renorm_every))
        object.__setattr__(self, "residual_every", check_renorm(self.residual_every, "residual_every"))
        object.__setattr__(self, "clusters", check_clusters(self.clusters))
        if self.error_weights_probe is not None and (self.error_weights is None
                                                     or not isinstance(self.error_weights_probe, str)):
            raise ConfigError(f"CalibrationOptions.error_weights_probe {self.error_weights_probe!r}: text saying how "
                              f"error_weights were measured; give it with error_weights only")

    def fingerprint(self) -> dict:
        """The options as JSON (the cost model left out; a ClusterSpec as its dict, which
        `clusters` takes back): recorded in the plan, and, error_weights and their probe aside,
        part of the checkpoint's fingerprint (checkpoint.fingerprint)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cost_model"}

        def plain(v):
            if isinstance(v, enum.Enum):
                return v.value
            return v.to_dict() if isinstance(v, ClusterSpec) else str(v)

        return json.loads(json.dumps(d, default=plain))
