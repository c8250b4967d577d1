"""Calibration: measure a model's attention and search, per head, for the fastest plan that keeps
the accuracy budget.

    result = vsopt.calibrate(model, calibration_inputs, budget=SiteErrorBudget(0.05), out="m.plan.json")
    result.plan        # vsopt.core.plan.Plan, also written to `out`
    print(result.table())   # per site: predicted and actual error, density, predicted time

Three passes over the calibration inputs, each running the model's rewritten graph eagerly and
looking at every attention site as it runs (vsopt.capture.run_observing):

1. measure: per site and head, the exact block attention mass (vsopt.core.metrics.
   block_attention_mass, blockwise, never N x N at once) in each of the 6 token orders.
   Each head gets the order whose top `order_density` blocks hold the most mass (PAROAttention's
   criterion, taken at the density we will run at). Candidates are then built per head in its
   order: the calibrated mask at several mass shares, the static patterns that fit the grid, a
   dynamic mask, skip, and dense.
2. errors: every candidate (and every quantization mode, at full density) is run through
   torch.ops.vsopt.block_sparse_attention on the site's real q/k/v, and the squared error of
   each head against exact float32 attention is accumulated. Predicted error^2 of a head for
   (candidate, quant) = its sparse error^2 + the quant mode's extra error^2 over bf16 at full
   density (independent errors add in squares).
3. search and check: per site (SiteErrorBudget) or over the model (DensityBudget), a Lagrangian
   search picks one (candidate, quant) per head minimizing the cost model's predicted time subject
   to the budget; then the chosen plan is run on the first calibration input and its ACTUAL
   error per site is reported beside the predicted one. A QualityFloor repeats the search with
   per-site budgets found by bisection until the model output on the held-out input passes.

The sums of passes 1 and 2 are checkpointed next to the output plan (safetensors + JSON metadata,
written atomically, at most every 20 s and at the end of each pass): an interrupted calibration
resumes where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import hashlib
import importlib
import json
import math
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from vsopt.backend import trace_and_rewrite
from vsopt.capture import (RecordedCall, SiteCall, choose_orders, order_block_mass, record_forward_inputs,
                           run_observing)
from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import DynamicMethod, DynamicSpec, pooled_block_scores, select_blocks
from vsopt.core.errors import ConfigError
from vsopt.core.ir import AttentionSite, TokenGrid
from vsopt.core.metrics import psnr, relative_l2
from vsopt.core.orders import TokenOrder, head_permutations
from vsopt.core.patterns import (FrameTiles, LocalWindow, Pattern, Radial, TemporalDiagonals, Union, VerticalStripes,
                                 block_mask, calibrated_block_mask, diagonal_blocks, num_blocks)
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity, StepPlan
from vsopt.costmodel import CostModel, Launch, SiteWork, sum_launches
from vsopt.timing import median_ms

# ----------------------------------------------------------------------------- budgets


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
    Fixed per-site costs (a precision's launch, dynamic-mask scoring, token permutations) are
    charged once per site, so a site drops dynamic heads or reorders when they cost more than
    they save. The time is the cost model's prediction (fitted on a GPU), not a measurement."""

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

    def passes(self, score: float) -> bool:
        return score >= self.value if self.metric is QualityMetric.PSNR else score <= self.value


Budget = SiteErrorBudget | DensityBudget | SpeedupBudget | QualityFloor


# ----------------------------------------------------------------------------- options


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
      squared error at that step costs in the final output (vsopt.sensitivity.euler_sensitivity);
      a DensityBudget or SpeedupBudget then minimizes the weighted sum (a step range takes the
      mean weight of its calibration steps). None: every site and step weighs 1.
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
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cost_model"}
        return json.loads(json.dumps(d, default=lambda v: v.value if isinstance(v, enum.Enum) else str(v)))


# ----------------------------------------------------------------------------- per-site state


@dataclass
class _Candidate:
    """One sparsity choice offered to every head of a site: masks (H, QB, KB) in each head's order
    (None for a dynamic candidate, whose mask depends on the input)."""

    label: str
    sparsity: Sparsity
    masks: torch.Tensor | None = None
    pattern: Pattern | None = None
    dynamic: DynamicSpec | None = None
    model_order: bool = False  # masks in the model's own order (FHW) for every head: no permutation


@dataclass
class _SiteState:
    """What calibration knows about one site in one step range."""

    site: AttentionSite
    opt: CalibrationOptions
    orders: tuple[TokenOrder, ...]
    mass: dict[TokenOrder, torch.Tensor] = field(default_factory=dict)  # (H, QB, KB) float64, summed
    mass_calls: int = 0
    head_orders: list[TokenOrder] | None = None
    candidates: list[_Candidate] | None = None
    err2: torch.Tensor | None = None  # (H, C) squared error of each candidate, quant none
    density: torch.Tensor | None = None  # (H, C) blocks kept / all blocks, summed over calls
    quant_err2: torch.Tensor | None = None  # (H, len(quants)) dense, per quant mode
    norm2: torch.Tensor | None = None  # (H,) squared norm of the exact output
    error_calls: int = 0

    @property
    def blocks(self) -> tuple[int, int]:
        return num_blocks(self.site.q_len, self.opt.block_m), num_blocks(self.site.kv_len, self.opt.block_n)


def calibratable(site: AttentionSite) -> str | None:
    """Why a site cannot be calibrated (it then stays dense), or None."""
    if site.q_len != site.kv_len:
        return "cross-attention (q_len != kv_len): left dense"
    if site.has_mask or site.is_causal:
        return "site has an attention mask or is causal: left dense"
    return None


def _kv_to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def _measure(state: _SiteState, call: SiteCall) -> None:
    """Pass 1: add this call's block mass in each candidate order (summed over the batch)."""
    mass = order_block_mass(call, state.site.grid, state.orders, state.opt.block_m, state.opt.block_n)
    for order, m in mass.items():
        state.mass[order] = state.mass[order] + m if order in state.mass else m
    state.mass_calls += call.q.shape[0]


def _build_candidates(state: _SiteState) -> None:
    """After pass 1: pick each head's order and list the sparsity candidates in those orders."""
    site, (qb, kb), opt = state.site, state.blocks, state.opt
    state.head_orders = choose_orders(state.mass, opt.order_density)
    mean = torch.stack([state.mass[o][h] for h, o in enumerate(state.head_orders)]) / max(1, state.mass_calls)
    cands = [_Candidate("dense", Sparsity.DENSE, torch.ones(site.heads, qb, kb, dtype=torch.bool))]
    seen = {cands[0].masks.numpy().tobytes()}
    for share in sorted(opt.mass_shares):
        masks = calibrated_block_mask(mean, share)
        if masks.numpy().tobytes() not in seen:
            seen.add(masks.numpy().tobytes())
            cands.append(_Candidate(f"mask@{share:g}", Sparsity.MASK, masks))
    if opt.patterns and site.grid is not None:
        for pattern in default_patterns(site.grid):
            masks = torch.stack([block_mask(pattern, site.grid, o, opt.block_m, opt.block_n)
                                 for o in state.head_orders])
            if masks.float().mean() < 0.9 and masks.numpy().tobytes() not in seen:
                seen.add(masks.numpy().tobytes())
                cands.append(_Candidate(describe_pattern(pattern), Sparsity.PATTERN, masks,
                                        pattern=pattern))
    if opt.dynamic:
        for value in opt.dynamic_values:
            spec = DynamicSpec(DynamicMethod.CUMULATIVE_MASS, value)
            cands.append(_Candidate(f"dynamic@{value:g}", Sparsity.DYNAMIC, dynamic=spec))
        for value in opt.dynamic_top_k:
            spec = DynamicSpec(DynamicMethod.TOP_K, value)
            cands.append(_Candidate(f"topk@{value:g}", Sparsity.DYNAMIC, dynamic=spec))
    if opt.model_order_candidates and any(o is not TokenOrder.FHW for o in state.head_orders):
        cands += _model_order_candidates(state, cands)
    if opt.skip:
        cands.append(_Candidate("skip", Sparsity.SKIP, torch.zeros(site.heads, qb, kb, dtype=torch.bool)))
    state.candidates = cands
    H, C = site.heads, len(cands)
    state.err2 = torch.zeros(H, C, dtype=torch.float64)
    state.density = torch.zeros(H, C, dtype=torch.float64)
    state.quant_err2 = torch.zeros(H, len(opt.quants), dtype=torch.float64)
    state.norm2 = torch.zeros(H, dtype=torch.float64)


def _model_order_candidates(state: _SiteState, cands: Sequence[_Candidate]) -> list[_Candidate]:
    """The sparse candidates again in the model's own token order for every head (labels end in
    "@fhw"): calibrated masks from the FHW block mass, patterns and dynamic masks in FHW."""
    site, opt = state.site, state.opt
    fhw_mass = state.mass[TokenOrder.FHW] / max(1, state.mass_calls)
    out = []
    for cand in cands:
        if cand.sparsity is Sparsity.MASK:
            share = float(cand.label.split("@", 1)[1])
            out.append(_Candidate(cand.label + "@fhw", Sparsity.MASK, calibrated_block_mask(fhw_mass, share),
                                  model_order=True))
        elif cand.sparsity is Sparsity.PATTERN:
            m = block_mask(cand.pattern, site.grid, TokenOrder.FHW, opt.block_m, opt.block_n)
            out.append(_Candidate(cand.label + "@fhw", Sparsity.PATTERN, m[None].expand(site.heads, -1, -1).clone(),
                                  pattern=cand.pattern, model_order=True))
        elif cand.sparsity is Sparsity.DYNAMIC:
            out.append(_Candidate(cand.label + "@fhw", Sparsity.DYNAMIC, dynamic=cand.dynamic, model_order=True))
    return out


def describe_pattern(p: Pattern) -> str:
    """Short text of a pattern, e.g. "local_window(1,2,2)" or "union(local_window(1,2,2)+vertical_stripes(0))"."""
    if isinstance(p, Union):
        return "union(" + "+".join(describe_pattern(x) for x in p.parts) + ")"
    values = [getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "text_global"]
    return f"{p.KIND}(" + ",".join("-".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in values) + ")"


def _sparse(qp, kp, vp, masks: torch.Tensor, scale: float, quant: Quant, block_m: int, block_n: int) -> torch.Tensor:
    """Block-sparse attention of permuted q/k/v (B, H, N, D) under masks (Bt, H, QB, KB)."""
    idx, counts = torch.ops.vsopt.mask_to_table(masks.to(qp.device))
    return torch.ops.vsopt.block_sparse_attention(qp, kp, vp, idx, counts, scale, block_m, block_n, quant.value)


def _exact(call: SiteCall) -> torch.Tensor:
    """Exact attention in float32, the reference every error is measured against."""
    H = call.q.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        call.q.float(), _kv_to_heads(call.k, H).float(), _kv_to_heads(call.v, H).float(), scale=call.scale)


def _permuted(state: _SiteState, call: SiteCall):
    H = call.q.shape[1]
    perm = head_permutations(state.site.grid, state.head_orders).to(call.q.device) if state.site.grid else None
    k, v = _kv_to_heads(call.k, H), _kv_to_heads(call.v, H)
    if perm is None or all(o is TokenOrder.FHW for o in state.head_orders):
        return None, call.q, k, v
    p = torch.ops.vsopt.permute_tokens
    return perm, p(call.q, perm), p(k, perm), p(v, perm)


def _unpermute(out: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return out if perm is None else torch.ops.vsopt.unpermute_tokens(out, perm)


def _dynamic_masks(qp, kp, spec: DynamicSpec, scale: float, block_m: int, block_n: int) -> torch.Tensor:
    """The masks a dynamic head predicts online (B, H, QB, KB) for these (permuted) q and k."""
    scores = pooled_block_scores(qp, kp, scale, block_m, block_n)
    diag = diagonal_blocks(qp.shape[2], kp.shape[2], block_m, block_n).to(qp.device)
    return select_blocks(scores, spec, diag)


def _head_err2(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (out.double() - ref.double()).pow(2).sum((0, 2, 3)).cpu()


def _measure_errors(state: _SiteState, call: SiteCall) -> None:
    """Pass 2: squared error of every candidate (quant none) and every quant mode (dense)."""
    ref = _exact(call)
    opt = state.opt
    blocks = (opt.block_m, opt.block_n)
    perm, qp, kp, vp = _permuted(state, call)
    H = call.q.shape[1]
    model_order = (None, call.q, _kv_to_heads(call.k, H), _kv_to_heads(call.v, H))
    for c, cand in enumerate(state.candidates):
        p, qc, kc, vc = model_order if cand.model_order else (perm, qp, kp, vp)
        if cand.sparsity is Sparsity.DYNAMIC:
            masks = _dynamic_masks(qc, kc, cand.dynamic, call.scale, *blocks)
        else:
            masks = cand.masks[None]
        out = _unpermute(_sparse(qc, kc, vc, masks, call.scale, Quant.NONE, *blocks), p)
        state.err2[:, c] += _head_err2(out, ref)
        state.density[:, c] += masks.float().mean((-1, -2)).expand(call.q.shape[0], -1).sum(0).double().cpu()
    dense = state.candidates[0].masks[None]
    for i, quant in enumerate(opt.quants):
        out = _unpermute(_sparse(qp, kp, vp, dense, call.scale, quant, *blocks), perm)
        state.quant_err2[:, i] += _head_err2(out, ref)
    state.norm2 += ref.double().pow(2).sum((0, 2, 3)).cpu()
    state.error_calls += call.q.shape[0]


# ----------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class HeadChoice:
    """What the search picked for one head, with its predicted squared error and time."""

    candidate: int
    quant: Quant
    err2: float
    time_us: float
    density: float


def _head_options(state: _SiteState, cost: CostModel, quants: Sequence[Quant]) -> list[list[HeadChoice]]:
    """Every (candidate, quant) of every head with its predicted squared error and time (µs)."""
    site = state.site
    qb, kb = state.blocks
    batch = max(1, site.batch)
    opt = state.opt
    dense_none = state.quant_err2[:, opt.quants.index(Quant.NONE)]
    permute_mib = 4 * batch * site.q_len * site.head_dim * site.dtype.itemsize / 2**20  # q, k, v in, out back
    options = []
    for h in range(site.heads):
        per_head = []
        for c, cand in enumerate(state.candidates):
            permuted = state.head_orders[h] is not TokenOrder.FHW and not cand.model_order
            density = float(state.density[h, c]) / max(1, state.error_calls)
            for quant in quants:
                qi = opt.quants.index(quant)
                if cand.sparsity is Sparsity.SKIP and quant is not Quant.NONE:
                    continue
                extra = max(0.0, float(state.quant_err2[h, qi] - dense_none[h]))
                err2 = float(state.err2[h, c]) + (extra if cand.sparsity is not Sparsity.SKIP else 0.0)
                t = 0.0
                if cand.sparsity is not Sparsity.SKIP:
                    launch = Launch(quant.value, site.head_dim, opt.block_m, opt.block_n, batch * qb,
                                    round(batch * density * qb * kb))
                    t = cost.predict_us(SiteWork((launch,))) - cost.launch_cost_us(launch)
                    if permuted and cand.sparsity is not Sparsity.DENSE:
                        t += permute_mib * cost.permute_us_per_mib / site.heads
                    if cand.sparsity is Sparsity.DYNAMIC:
                        t += batch * qb * kb * cost.score_us_per_block
                per_head.append(HeadChoice(c, quant, err2, t, density))
        options.append(per_head)
    return options


def _pick(options: list[list[HeadChoice]], lam: float) -> list[HeadChoice]:
    """Per head, the option minimizing time + lam * err2 (ties: the lower error)."""
    return [min(opts, key=lambda o: (o.time_us + lam * o.err2, o.err2)) for opts in options]


def _bisect_lambda(options, feasible: Callable[[list[HeadChoice]], bool], scale: float) -> list[HeadChoice]:
    """The cheapest Lagrangian choice that is feasible; `scale` sets lambda's units. If even the
    most accurate choice (lambda -> inf) is infeasible, return that one."""
    lo, hi = -12.0, 12.0  # log10 of lambda * scale
    best = _pick(options, 10.0 ** hi / scale)
    if not feasible(best):
        return [min(opts, key=lambda o: (o.err2, o.time_us)) for opts in options]
    for _ in range(50):
        mid = (lo + hi) / 2
        choice = _pick(options, 10.0 ** mid / scale)
        if feasible(choice):
            hi, best = mid, choice
        else:
            lo = mid
    return best


def _spend_slack(options, choice: list[HeadChoice], limit: float) -> list[HeadChoice]:
    """Greedy finish of a Lagrangian solution, which may leave part of the error budget unused:
    repeatedly make the single-head move that saves the most time while staying within `limit`."""
    choice = list(choice)
    used = sum(o.err2 for o in choice)
    while True:
        best = None
        for h, opts in enumerate(options):
            for o in opts:
                saving = choice[h].time_us - o.time_us
                if saving > 1e-12 and used - choice[h].err2 + o.err2 <= limit and (best is None or saving > best[0]):
                    best = (saving, h, o)
        if best is None:
            return choice
        _, h, o = best
        used += o.err2 - choice[h].err2
        choice[h] = o


def search_site_error(state: _SiteState, cost: CostModel, max_rel_l2: float) -> list[HeadChoice]:
    """Fastest per-head choice whose predicted site error is within max_rel_l2: a Lagrangian
    relaxation (per head, minimize time + lambda * error^2, lambda bisected) finished greedily.
    Each precision costs a launch of its own, which per-head costs cannot see: the search runs
    once with every precision allowed per head and once per single precision (plus skips), and
    keeps the fastest feasible result by the full site cost."""
    norm2 = float(state.norm2.sum())
    limit = (max_rel_l2 ** 2) * norm2
    results = []
    quant_sets = [state.opt.quants] + ([(q,) for q in state.opt.quants] if len(state.opt.quants) > 1 else [])
    for quants in quant_sets:
        options = _head_options(state, cost, quants)
        choice = _bisect_lambda(options, lambda ch: sum(o.err2 for o in ch) <= limit, scale=norm2 / 1e3)
        if sum(o.err2 for o in choice) <= limit:
            choice = _spend_slack(options, choice, limit)
        err = sum(o.err2 for o in choice)
        results.append((err > limit, predicted_time_us(state, choice, cost) if err <= limit else err, choice))
    best = min(results, key=lambda r: (r[0], r[1]))[2]
    # a site left as the model's dense attention costs no lowering overhead: keep it if the
    # plan's predicted saving does not pay for that overhead
    dense = _dense_choices(state)
    if predicted_time_us(state, best, cost) + state.opt.site_overhead_us >= predicted_time_us(state, dense, cost):
        return dense
    return best


def _dense_choices(state: _SiteState) -> list[HeadChoice]:
    """Every head dense, unquantized (the site stays the model's own attention)."""
    none = state.opt.quants.index(Quant.NONE)
    return [HeadChoice(0, Quant.NONE, float(state.quant_err2[h, none]), 0.0, 1.0) for h in range(state.site.heads)]


def search_density(states: Sequence[_SiteState], cost: CostModel, density: float, quant: Quant,
                   error_weights: Sequence[float] | None = None) -> list[list[HeadChoice]]:
    """Least summed relative squared error over sites with overall block density <= density;
    with error_weights (one per state), the sum of weight * relative squared error."""
    all_options = [_head_options(s, cost, (quant,)) for s in states]
    norms = [float(s.norm2.sum()) for s in states]
    factors = [1.0] * len(states) if error_weights is None else [float(w) for w in error_weights]
    if len(factors) != len(states) or not all(w >= 0 for w in factors):
        raise ConfigError(f"search_density: need one non-negative error weight per site, got {error_weights}")
    # recast each option: "time" = blocks it keeps, error relative to its site's norm, weighted
    recast, sizes = [], []
    for opts_site, norm, f, s in zip(all_options, norms, factors, states):
        qb, kb = s.blocks
        for opts in opts_site:
            recast.append([HeadChoice(o.candidate, o.quant, f * o.err2 / norm, o.density * qb * kb, o.density)
                           for o in opts])
            sizes.append(qb * kb)
    total = sum(sizes)
    # minimize err + mu * blocks: bisect mu so that blocks fit the budget
    lo, hi = -12.0, 12.0

    def pick(mu):
        return [min(opts, key=lambda o: (o.err2 + mu * o.time_us / total, o.time_us)) for opts in recast]

    best = pick(10.0 ** hi)
    for _ in range(50):
        mid = (lo + hi) / 2
        choice = pick(10.0 ** mid)
        if sum(o.time_us for o in choice) <= density * total + 1e-9:
            hi, best = mid, choice
        else:
            lo = mid
    out, i = [], 0
    for opts_site in all_options:
        chosen = best[i:i + len(opts_site)]
        i += len(opts_site)
        out.append([next(o for o in opts if o.candidate == ch.candidate) for opts, ch in zip(opts_site, chosen)])
    return out


def _site_variants(state: _SiteState, options: list[list[HeadChoice]]) -> list[list[list[HeadChoice]]]:
    """The per-head options of a site restricted by which fixed per-site costs it may pay: with or
    without dynamic heads (mask scoring), with or without permuted heads. Dense and skip stay in
    every variant. A Lagrangian over per-head marginal times cannot see a fixed cost; picking the
    best variant per site by its full predicted time can."""
    cands = state.candidates

    def permuted(h, o):
        c = cands[o.candidate]
        return (state.head_orders[h] is not TokenOrder.FHW and not c.model_order
                and c.sparsity not in (Sparsity.DENSE, Sparsity.SKIP))

    has_dyn = any(cands[o.candidate].sparsity is Sparsity.DYNAMIC for opts in options for o in opts)
    has_perm = any(permuted(h, o) for h, opts in enumerate(options) for o in opts)
    variants = []
    for dyn in ((False, True) if has_dyn else (False,)):
        for perm in ((False, True) if has_perm else (False,)):
            variants.append([[o for o in opts if (dyn or cands[o.candidate].sparsity is not Sparsity.DYNAMIC)
                              and (perm or not permuted(h, o))] for h, opts in enumerate(options)])
    return variants


def search_time(states: Sequence[_SiteState], cost: CostModel, speedup: float, quant: Quant,
                error_weights: Sequence[float] | None = None) -> list[list[HeadChoice]]:
    """Least summed (weighted) relative squared error over sites whose predicted attention time,
    summed over the sites (cost model, fixed per-site costs included), is at most the dense
    time / speedup.

    Lagrangian: for a price mu on time, each site takes, over its variants (_site_variants), the
    per-head minimizers of err + mu * marginal time, and keeps the variant minimizing its error +
    mu * full predicted site time; mu is bisected to the cheapest price that fits. A greedy pass
    then spends the time left over on the moves that cut the most error per microsecond. If even
    the fastest choice does not fit (no skip candidates), the fastest is returned."""
    factors = [1.0] * len(states) if error_weights is None else [float(w) for w in error_weights]
    if len(factors) != len(states) or not all(w >= 0 for w in factors):
        raise ConfigError(f"search_time: need one non-negative error weight per site, got {error_weights}")
    sites, full = [], []  # per state: variants of the recast options; the original options
    for st, f in zip(states, factors):
        norm = max(float(st.norm2.sum()), 1e-300)
        full.append(_head_options(st, cost, (quant,)))
        opts = [[HeadChoice(o.candidate, o.quant, f * o.err2 / norm, o.time_us, o.density) for o in per_head]
                for per_head in full[-1]]
        sites.append(_site_variants(st, opts))
    dense_total = sum(predicted_time_us(st, _dense_choices(st), cost) for st in states)
    limit = dense_total / speedup

    def site_pick(i, mu):
        best = None
        for variant in sites[i]:
            ch = [min(opts, key=lambda o: (o.err2 + mu * o.time_us, o.time_us)) for opts in variant]
            t = predicted_time_us(states[i], ch, cost)
            obj = sum(o.err2 for o in ch) + mu * t
            if best is None or obj < best[0]:
                best = (obj, t, ch)
        return best[1], best[2]

    def pick(mu):
        picked = [site_pick(i, mu) for i in range(len(states))]
        return sum(t for t, _ in picked), [ch for _, ch in picked], [t for t, _ in picked]

    lo, hi = -12.0, 12.0  # log10 of mu * dense_total (errors are relative, ~1)
    total, best, times = pick(10.0 ** hi / dense_total)
    if total <= limit + 1e-9:
        for _ in range(50):
            mid = (lo + hi) / 2
            t, ch, ts = pick(10.0 ** mid / dense_total)
            if t <= limit + 1e-9:
                hi, total, best, times = mid, t, ch, ts
            else:
                lo = mid
        best, times = _spend_time(states, sites, best, times, limit, cost)
    return [[next(o for o in opts if o.candidate == ch.candidate) for opts, ch in zip(site_full, chosen)]
            for site_full, chosen in zip(full, best)]


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
                    t = predicted_time_us(states[i], trial, cost)
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


def _head_plans(state: _SiteState, choices: Sequence[HeadChoice]) -> tuple[HeadPlan, ...]:
    heads = []
    for h, ch in enumerate(choices):
        cand = state.candidates[ch.candidate]
        # a dense or skipped head gains nothing from a permutation: keep the model's order
        order = state.head_orders[h] if cand.sparsity in (Sparsity.MASK, Sparsity.PATTERN, Sparsity.DYNAMIC) \
            and not cand.model_order else TokenOrder.FHW
        common = dict(order=order, quant=ch.quant if cand.sparsity is not Sparsity.SKIP else Quant.NONE,
                      block_m=state.opt.block_m, block_n=state.opt.block_n)
        if cand.sparsity is Sparsity.MASK:
            heads.append(HeadPlan(Sparsity.MASK, mask=cand.masks[h], **common))
        elif cand.sparsity is Sparsity.PATTERN:
            heads.append(HeadPlan(Sparsity.PATTERN, pattern=cand.pattern, **common))
        elif cand.sparsity is Sparsity.DYNAMIC:
            heads.append(HeadPlan(Sparsity.DYNAMIC, dynamic=cand.dynamic, **common))
        else:
            heads.append(HeadPlan(cand.sparsity, **common))
    return tuple(heads)


def predicted_time_us(state: _SiteState, choices: Sequence[HeadChoice], cost: CostModel) -> float:
    """Cost-model time of the site with these choices: one launch per precision used."""
    site = state.site
    qb, kb = state.blocks
    batch = max(1, site.batch)
    live = [(h, ch) for h, ch in enumerate(choices) if state.candidates[ch.candidate].sparsity is not Sparsity.SKIP]
    launches = sum_launches(Launch(ch.quant.value, site.head_dim, state.opt.block_m, state.opt.block_n, batch * qb,
                                   round(batch * ch.density * qb * kb)) for _, ch in live)
    permuted = [h for h, ch in live if state.candidates[ch.candidate].sparsity is not Sparsity.DENSE
                and not state.candidates[ch.candidate].model_order and state.head_orders[h] is not TokenOrder.FHW]
    permute_mib = 4 * batch * site.q_len * site.head_dim * site.dtype.itemsize * len(permuted) / 2**20
    scored = sum(batch * qb * kb for _, ch in live if state.candidates[ch.candidate].sparsity is Sparsity.DYNAMIC)
    return cost.predict_us(SiteWork(launches, permute_mib, scored))


# ----------------------------------------------------------------------------- results


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


# ----------------------------------------------------------------------------- applying a plan (reference)


def site_plan_output(site: AttentionSite, heads: Sequence[HeadPlan], call: SiteCall) -> torch.Tensor:
    """What a site computes under `heads` (one HeadPlan per query head), from its q/k/v: the same
    math the lowered graph runs (per-head permutation, block-sparse attention per precision group,
    inverse permutation), built only from the plan. Returns (B, H, N, Dv) in float32."""
    H = call.q.shape[1]
    blocks = {(h.block_m, h.block_n) for h in heads}
    if len(blocks) != 1:
        raise ConfigError(f"site {site.site_id!r}: heads with different block sizes {sorted(blocks)}")
    blocks = blocks.pop()
    k, v = _kv_to_heads(call.k, H), _kv_to_heads(call.v, H)
    orders = [h.order for h in heads]
    perm = None
    if any(o is not TokenOrder.FHW for o in orders):
        perm = head_permutations(site.grid, orders).to(call.q.device)
        p = torch.ops.vsopt.permute_tokens
        qp, kp, vp = p(call.q, perm), p(k, perm), p(v, perm)
    else:
        qp, kp, vp = call.q, k, v
    masks = []
    for h, hp in enumerate(heads):
        m = hp.block_mask(site.q_len, site.kv_len, site.grid)
        if m is None:  # dynamic: predicted from this input's q/k
            m = _dynamic_masks(qp[:, h:h + 1], kp[:, h:h + 1], hp.dynamic, call.scale, hp.block_m, hp.block_n)[:, 0]
        masks.append(m.to(call.q.device).expand(call.q.shape[0], -1, -1))
    masks = torch.stack(masks, dim=1)  # (B, H, QB, KB)
    out = torch.zeros(*call.q.shape[:3], v.shape[-1], dtype=torch.float32, device=call.q.device)
    for quant in sorted({hp.quant for hp in heads}, key=lambda q: q.value):
        group = torch.tensor([hp.quant is quant for hp in heads], device=call.q.device)
        part = _sparse(qp, kp, vp, masks & group[None, :, None, None], call.scale, quant, *blocks)
        out += part.float() * group[None, :, None, None]
    return _unpermute(out, perm)


# ----------------------------------------------------------------------------- checkpoint


class _Checkpoint:
    """Calibration state next to the output plan (`<plan>.calibration.safetensors`): the summed
    measurements of every site and how many inputs each pass has finished, with a fingerprint of
    the model's sites, the options and the inputs. Written atomically after each input."""

    def __init__(self, plan_path: str | os.PathLike, fingerprint: str, every_s: float = 20.0):
        self.path = Path(str(plan_path) + ".calibration.safetensors")
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the plan's folder may not exist yet
        self.fingerprint = fingerprint
        self.every_s = every_s  # at most one write per every_s seconds, except when forced
        self._last = time.monotonic()

    def load(self, states: dict[tuple[str, int], _SiteState]) -> tuple[int, int]:
        """Restore states; returns (inputs measured, inputs error-checked); (0, 0) if no usable file."""
        from safetensors import SafetensorError, safe_open

        if not self.path.exists():
            return 0, 0
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads(f.metadata()["state"])
                if meta.get("fingerprint") != self.fingerprint:
                    print(f"vsopt calibrate: {self.path} is from another model, input set or options; starting over",
                          file=sys.stderr)
                    return 0, 0
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            print(f"vsopt calibrate: ignoring unreadable checkpoint {self.path}: {e}", file=sys.stderr)
            return 0, 0
        for key, st in states.items():
            name = _state_name(key)
            st.mass_calls = meta["mass_calls"].get(name, 0)
            st.mass = {o: tensors[f"{name}|mass|{o.value}"] for o in st.orders if f"{name}|mass|{o.value}" in tensors}
            if meta["errors_done"]:
                _build_candidates(st)
                for attr in ("err2", "density", "quant_err2", "norm2"):
                    setattr(st, attr, tensors[f"{name}|{attr}"])
                st.error_calls = meta["error_calls"][name]
        return meta["measured"], meta["errors_done"]

    def save(self, states: dict[tuple[str, int], _SiteState], measured: int, errors_done: int,
             force: bool = False) -> None:
        """Write the state (a big model's sums are large: at most every `every_s` s unless forced)."""
        from safetensors.torch import save_file

        if not force and time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        tensors, meta = {}, {"fingerprint": self.fingerprint, "measured": measured, "errors_done": errors_done,
                             "mass_calls": {}, "error_calls": {}}
        for key, st in states.items():
            name = _state_name(key)
            meta["mass_calls"][name] = st.mass_calls
            for o, m in st.mass.items():
                tensors[f"{name}|mass|{o.value}"] = m.contiguous()
            if errors_done:
                meta["error_calls"][name] = st.error_calls
                for attr in ("err2", "density", "quant_err2", "norm2"):
                    tensors[f"{name}|{attr}"] = getattr(st, attr).contiguous()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"state": json.dumps(meta)})
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()


def _state_name(key: tuple[str, int]) -> str:
    return f"{key[0]}@{key[1]}"


def _fingerprint(sites: Sequence[AttentionSite], inputs: Sequence[RecordedCall], options: CalibrationOptions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([s.to_dict() for s in sites], sort_keys=True).encode())
    h.update(json.dumps(options.fingerprint(), sort_keys=True).encode())
    for call in inputs:  # shapes and cheap statistics of every input tensor
        for x in [*call.args, *call.kwargs.values()]:
            if isinstance(x, torch.Tensor):
                xf = x.detach().double()
                h.update(f"{call.step}:{tuple(x.shape)}:{float(xf.sum()):.12e}:{float(xf.abs().sum()):.12e}".encode())
            else:
                h.update(repr(x).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class _Signature:
    """How calibration inputs with keyword arguments become positional ones: the traced graph
    takes positional inputs only, so tensor kwargs (`keys`) follow the `n_args` positional args,
    and non-tensor kwargs (`fixed`, e.g. return_dict=False) are bound."""

    n_args: int
    keys: tuple[str, ...] = ()
    fixed: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def bound(self, model: torch.nn.Module) -> Iterator[None]:
        """While active, model(*positional) calls the original forward with the keywords put back.
        The forward is replaced on the instance (not wrapped in another module) so that module
        paths, and with them the site ids, stay the model's own."""
        if not self.keys and not self.fixed:
            yield
            return
        previous = model.__dict__.get("forward")
        original = model.forward

        def forward(*flat):
            return original(*flat[:self.n_args], **dict(zip(self.keys, flat[self.n_args:])), **self.fixed)

        model.forward = forward
        try:
            yield
        finally:
            if previous is not None:
                model.forward = previous
            else:
                del model.forward


def _as_recorded(x: Any, i: int) -> RecordedCall:
    if isinstance(x, RecordedCall):
        return x
    if isinstance(x, torch.Tensor):
        return RecordedCall(i, i, (x,), {})
    if isinstance(x, (tuple, list)):
        return RecordedCall(i, i, tuple(x), {})
    raise ConfigError(f"calibration input {i}: expected a tuple of positional inputs, a tensor or a RecordedCall, "
                      f"got {type(x).__name__}")


def _positional(model: torch.nn.Module, calls: Sequence[RecordedCall]) -> tuple[_Signature, list[tuple]]:
    first = calls[0]
    for c in calls:
        if len(c.args) != len(first.args) or sorted(c.kwargs) != sorted(first.kwargs):
            raise ConfigError(f"calibration input {c.index} has a different signature from input {first.index}")
    keys = tuple(sorted(k for k, v in first.kwargs.items() if isinstance(v, torch.Tensor)))
    fixed = {k: v for k, v in first.kwargs.items() if not isinstance(v, torch.Tensor)}
    return _Signature(len(first.args), keys, fixed), [(*c.args, *(c.kwargs[k] for k in keys)) for c in calls]


def _range_of(step: int, ranges: Sequence[tuple[int, int | None]] | None) -> int | None:
    if ranges is None:
        return 0
    for r, (a, b) in enumerate(ranges):
        if a <= step and (b is None or step < b):
            return r
    return None


def _budget_text(budget: Budget) -> str:
    if isinstance(budget, SiteErrorBudget):
        return f"per-site relative L2 <= {budget.max_rel_l2:g}"
    if isinstance(budget, DensityBudget):
        return f"overall density <= {budget.density:g}, quant {budget.quant.value}"
    if isinstance(budget, SpeedupBudget):
        return f"predicted attention speedup >= {budget.speedup:g}x (cost model), quant {budget.quant.value}"
    op = ">=" if budget.metric is QualityMetric.PSNR else "<="
    return f"held-out {budget.metric.value} {op} {budget.value:g}"


def calibrate(model: torch.nn.Module, calibration_inputs: Sequence[Any], budget: Budget, *,
              options: CalibrationOptions | None = None, out: str | os.PathLike | None = None, resume: bool = True,
              progress: bool = True, grid: TokenGrid | None = None,
              grids: dict[str, TokenGrid] | None = None) -> CalibrationResult:
    """Measure `model`'s attention on `calibration_inputs` and return the fastest plan under `budget`.

    calibration_inputs: a sequence of positional-input tuples (or RecordedCalls from
      vsopt.capture.record_forward_inputs, which also carry kwargs and the denoising step).
    budget: SiteErrorBudget, DensityBudget or QualityFloor (see their docs).
    out: where to write the plan (JSON, plus safetensors masks beside it); the checkpoint
      `<out>.calibration.safetensors` lets an interrupted run resume (resume=False starts over);
      it is removed once the plan is written.
    grid / grids: token grids for sites whose grid cannot be inferred (as in the backend options).
    """
    return calibrate_many(model, calibration_inputs, [budget], options=options, out=out, resume=resume,
                          progress=progress, grid=grid, grids=grids)[0]


def calibrate_many(model: torch.nn.Module, calibration_inputs: Sequence[Any], budgets: Sequence[Budget], *,
                   options: CalibrationOptions | None = None, out: str | os.PathLike | None = None,
                   resume: bool = True, progress: bool = True, grid: TokenGrid | None = None,
                   grids: dict[str, TokenGrid] | None = None) -> list[CalibrationResult]:
    """calibrate() for several budgets on one set of measurements (the two passes run once, then
    one search, plan and check per budget). With `out`, only one budget (the plan is written)."""
    options = options or CalibrationOptions()
    budgets = list(budgets)
    if not budgets:
        raise ConfigError("calibrate_many needs at least one budget")
    if out is not None and len(budgets) != 1:
        raise ConfigError("calibrate_many: `out` takes one budget; write each result's plan yourself")
    for budget in budgets:
        if not isinstance(budget, (SiteErrorBudget, DensityBudget, SpeedupBudget, QualityFloor)):
            raise ConfigError(f"budget must be a SiteErrorBudget, DensityBudget, SpeedupBudget or QualityFloor, "
                              f"got {budget!r}")
    calls = [_as_recorded(x, i) for i, x in enumerate(calibration_inputs)]
    if not calls:
        raise ConfigError("calibrate needs at least one calibration input")
    cost = options.cost_model or CostModel.default(torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    signature, positional = _positional(model, calls)
    config = VsoptConfig(grid=grid, grids=dict(grids or {}))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with signature.bound(model):
                gm, report = trace_and_rewrite(model, positional[0], config)
        left_dense = {s.site_id: why for s in report.sites if (why := calibratable(s))}
        sites = [s for s in report.sites if s.site_id not in left_dense]
        if not sites:
            raise ConfigError(f"no attention site to calibrate: found {len(report.sites)} site(s), left dense: "
                              f"{left_dense or 'none'}")
        ranges = options.step_ranges
        range_ids = [_range_of(c.step, ranges) for c in calls]
        used = sorted({r for r in range_ids if r is not None})
        if not used:
            raise ConfigError(f"no calibration input falls in the step ranges {ranges}")
        states = {(s.site_id, r): _SiteState(s, options, options.orders if s.grid is not None else (TokenOrder.FHW,))
                  for s in sites for r in used}
        ckpt = _Checkpoint(out, _fingerprint(sites, calls, options)) if out is not None else None
        measured, errors_done = ckpt.load(states) if (ckpt and resume) else (0, 0)

        def observe(fn, r):
            return lambda call: None if (call.site_id, r) not in states else fn(states[(call.site_id, r)], call)

        with torch.no_grad():
            bar = tqdm(range(len(calls)), desc="calibrate: measure block mass", disable=not progress, initial=measured)
            for i in range(measured, len(calls)):
                if range_ids[i] is not None:
                    run_observing(gm, positional[i], observe(_measure, range_ids[i]))
                if ckpt:
                    ckpt.save(states, i + 1, 0, force=i + 1 == len(calls))
                bar.update(1)
            bar.close()
            if not errors_done:
                for st in states.values():
                    _build_candidates(st)
            # pass 2 on the first `error_inputs` inputs of each step range
            take, seen = [], {}
            for i, r in enumerate(range_ids):
                if r is not None and seen.get(r, 0) < (options.error_inputs or len(calls)):
                    take.append(i)
                    seen[r] = seen.get(r, 0) + 1
            bar = tqdm(range(len(take)), desc="calibrate: candidate errors", disable=not progress, initial=errors_done)
            for j in range(errors_done, len(take)):
                run_observing(gm, positional[take[j]], observe(_measure_errors, range_ids[take[j]]))
                if ckpt:
                    ckpt.save(states, len(calls), j + 1, force=j + 1 == len(take))
                bar.update(1)
            bar.close()

            first_of_range = {r: positional[range_ids.index(r)] for r in used}
            found = []
            searched = any(not isinstance(b, QualityFloor) for b in budgets)   # the budgets that use weights
            weights = _state_weights(states, calls, range_ids, options.error_weights) if searched else None
            for budget in budgets:
                if isinstance(budget, QualityFloor):
                    held = _positional(model, [*calls, _as_recorded(budget.held_out, len(calls))])[1][-1]
                    plan, results, quality = _quality_search(model, signature, held, states, used, options, cost,
                                                             budget, config, progress)
                else:
                    choices = _search(states, cost, budget, weights)
                    plan, results = _assemble(states, choices, options, cost, budget)
                    quality = None
                _verify(gm, states, plan, results, first_of_range, options.step_ranges)
                found.append(CalibrationResult(plan, results, left_dense, _budget_text(budget), quality))
        if out is not None:
            found[0].plan.save(out)
            if ckpt:
                ckpt.remove()
        return found
    finally:
        model.train(was_training)


def _search(states: dict, cost: CostModel, budget: Budget,
            weights: dict[tuple[str, int], float] | None = None) -> dict[tuple[str, int], list[HeadChoice]]:
    if isinstance(budget, SiteErrorBudget):
        return {key: search_site_error(st, cost, budget.max_rel_l2) for key, st in states.items()}
    keys = list(states)
    w = None if weights is None else [weights[k] for k in keys]
    if isinstance(budget, SpeedupBudget):
        picked = search_time([states[k] for k in keys], cost, budget.speedup, budget.quant, w)
    else:
        picked = search_density([states[k] for k in keys], cost, budget.density, budget.quant, w)
    return dict(zip(keys, picked))


def _state_weights(states: dict, calls: Sequence[RecordedCall], range_ids: Sequence[int | None],
                   error_weights: dict[str, dict[int, float]] | None) -> dict[tuple[str, int], float] | None:
    """Each (site, step range)'s error weight: the mean of error_weights[site][step] over the
    calibration inputs' steps in the range (None without error_weights)."""
    if error_weights is None:
        return None
    out = {}
    for sid, r in states:
        steps = sorted({c.step for c, rid in zip(calls, range_ids) if rid == r})
        missing = [st for st in steps if st not in error_weights.get(sid, {})]
        if missing:
            raise ConfigError(f"error_weights has no weight for site {sid!r} at step(s) {missing}")
        out[(sid, r)] = sum(error_weights[sid][st] for st in steps) / len(steps)
    return out


def _assemble(states: dict, choices: dict, options: CalibrationOptions, cost: CostModel,
              budget: Budget) -> tuple[Plan, list[SiteResult]]:
    """The plan and the per-site predictions for one set of choices."""
    site_plans, results = {}, []
    ranges = options.step_ranges
    by_site: dict[str, list[tuple[int, tuple[HeadPlan, ...]]]] = {}
    for (sid, r), st in states.items():
        ch = choices[(sid, r)]
        heads = _head_plans(st, ch)
        by_site.setdefault(sid, []).append((r, heads))
        dense = [HeadChoice(0, Quant.NONE, 0.0, 0.0, 1.0)] * st.site.heads
        results.append(SiteResult(
            sid, None if ranges is None else ranges[r],
            predicted_rel_l2=math.sqrt(sum(c.err2 for c in ch) / max(float(st.norm2.sum()), 1e-300)),
            actual_rel_l2=None, density=sum(c.density for c in ch) / len(ch),
            predicted_us=predicted_time_us(st, ch, cost), dense_us=predicted_time_us(st, dense, cost),
            choices=[f"{st.candidates[c.candidate].label}/{c.quant.value}/{hp.order.value}" for c, hp in zip(ch, heads)]))
    for sid, entries in by_site.items():
        site = states[(sid, entries[0][0])].site
        if ranges is None:
            site_plans[sid] = SitePlan.for_site(site, entries[0][1])
        else:
            # the earliest calibrated range (usually the densest) also serves steps no range covers
            steps = [StepPlan(ranges[r][0], ranges[r][1], heads) for r, heads in entries]
            site_plans[sid] = SitePlan.for_site(site, entries[0][1], steps)
    meta = {"calibration": {"budget": _budget_text(budget), "options": options.fingerprint(), "cost_model": cost.gpu,
                            "predicted": {r.site_id + ("" if r.steps is None else f"@{r.steps[0]}"): r.predicted_rel_l2
                                          for r in results}}}
    return Plan(site_plans, meta), results


def _verify(gm, states: dict, plan: Plan, results: list[SiteResult], first_of_range: dict[int, tuple],
            ranges: Sequence[tuple[int, int | None]] | None) -> None:
    """Run the plan's math on the first input of each step range and fill in actual errors."""
    by_key = {(r.site_id, 0 if ranges is None else ranges.index(r.steps)): r for r in results}
    for rng, inputs in first_of_range.items():
        err2, norm2 = {}, {}

        def observer(call: SiteCall):
            key = (call.site_id, rng)
            if key not in states:
                return None
            st = states[key]
            sp = plan[call.site_id]
            heads = sp.heads if ranges is None else sp.heads_at(ranges[rng][0])
            ref = _exact(call)
            out = site_plan_output(st.site, heads, call)
            err2[key] = err2.get(key, 0.0) + float((out.double() - ref.double()).pow(2).sum())
            norm2[key] = norm2.get(key, 0.0) + float(ref.double().pow(2).sum())
            return None

        run_observing(gm, inputs, observer)
        for key in err2:
            by_key[key].actual_rel_l2 = math.sqrt(err2[key] / max(norm2[key], 1e-300))


def _model_output(out: Any) -> torch.Tensor:
    """The first tensor of a model's output (diffusers returns tuples or dataclasses)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"cannot take a tensor from the model output of type {type(out).__name__}")


def _quality_search(model, signature: _Signature, held: tuple, states, used, options, cost, budget: QualityFloor, config,
                    progress) -> tuple[Plan, list[SiteResult], float]:
    """Bisect a per-site error budget (log scale) for the loosest one whose plan keeps the held-out
    output within the floor; the held-out input runs with each site's output replaced by the plan's."""
    with signature.bound(model):
        held_gm, _ = trace_and_rewrite(model, held, config)
        dense_out = _model_output(model(*held)).float()

    def score(plan: Plan) -> float:
        def substitute(call: SiteCall):
            if call.site_id not in plan.sites:
                return None
            sp = plan[call.site_id]
            return site_plan_output(states[(call.site_id, used[0])].site, sp.heads, call)

        out = _model_output(run_observing(held_gm, held, substitute)).float()
        return psnr(out, dense_out) if budget.metric is QualityMetric.PSNR else relative_l2(out, dense_out)

    def build(eps: float):
        choices = _search(states, cost, SiteErrorBudget(eps))
        return _assemble(states, choices, options, cost, budget)

    lo, hi = math.log(1e-3), math.log(0.5)
    best = build(math.exp(lo))
    best_score = score(best[0])
    if not budget.passes(best_score):
        raise ConfigError(f"even a per-site error budget of 1e-3 gives held-out {budget.metric.value} "
                          f"{best_score:.4g}, which misses the floor {budget.value:g}")
    for _ in tqdm(range(budget.iterations), desc="calibrate: quality floor", disable=not progress):
        mid = (lo + hi) / 2
        cand = build(math.exp(mid))
        s = score(cand[0])
        if budget.passes(s):
            lo, best, best_score = mid, cand, s
        else:
            hi = mid
    plan, results = best
    plan.meta["calibration"]["held_out_score"] = best_score
    plan.meta["calibration"]["site_error_budget"] = math.exp(lo)
    return plan, results, best_score


def check_plan(model: torch.nn.Module, call: RecordedCall, plan_path: str | os.PathLike,
               grid: TokenGrid | None = None, repeats: int = 10, compile: bool = True) -> dict[str, Any]:
    """Run `model` on one input dense, as the plan-lowered graph run eagerly (the kernels called
    directly), and through torch.compile(backend="vsopt") with the plan (Inductor).

    Returns, for "lowered" and "compiled": relative L2 and PSNR of the model output against the
    dense model, and on CUDA the median milliseconds per call (dense: eager and torch.compile's
    default backend). A torch.compile failure is returned as "compiled_error" (its first line),
    not raised: the lowered graph's numbers still stand. compile=False skips torch.compile."""
    signature, (inputs,) = _positional(model, [call])
    config = VsoptConfig(plan=Plan.load(plan_path), grid=grid)
    on_gpu = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    check: dict[str, Any] = {}
    with torch.no_grad():
        with signature.bound(model):
            lowered, _ = trace_and_rewrite(model, inputs, config)
        dense_out = _model_output(model(*call.args, **call.kwargs)).float()
        out = _model_output(lowered(*inputs)).float()
        check.update(lowered_rel_l2=relative_l2(out, dense_out), lowered_psnr_db=psnr(out, dense_out))
        if on_gpu:
            check["dense_eager_ms"] = median_ms(lambda: model(*call.args, **call.kwargs), repeats)
            check["lowered_eager_ms"] = median_ms(lambda: lowered(*inputs), repeats)
        options = {"plan": os.fspath(plan_path)}
        if grid is not None:
            options["grid"] = grid
        if not compile:
            return check
        try:
            compiled = torch.compile(model, backend="vsopt", options=options)
            out = _model_output(compiled(*call.args, **call.kwargs)).float()
            check.update(compiled_rel_l2=relative_l2(out, dense_out), compiled_psnr_db=psnr(out, dense_out))
            if on_gpu:
                baseline = torch.compile(model)
                check["dense_compiled_ms"] = median_ms(lambda: baseline(*call.args, **call.kwargs), repeats)
                check["compiled_ms"] = median_ms(lambda: compiled(*call.args, **call.kwargs), repeats)
        except Exception as e:  # noqa: BLE001 - reported, the lowered numbers still stand
            check["compiled_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    return check


# ----------------------------------------------------------------------------- the reference model


def reference_model_inputs(ref, *, clips: int = 2, steps: int = 8, seed: int = 0, every: int = 1,
                           guidance: float = 1.0) -> list[RecordedCall]:
    """Inputs of the shipped reference model's transformer at each denoising step of a sampler run
    over `clips` random descriptions (vsopt.models): RecordedCalls whose `step` is the sampler step,
    on the model's device. With guidance != 1 each step's call holds the cond and uncond batch."""
    from vsopt.models import data, sampler

    device = next(ref.transformer.parameters()).device
    _, tokens = data.make_batch(clips, seed)
    cond = ref.encode(tokens.to(device))
    uncond = ref.encode(torch.zeros_like(tokens[:1]).to(device)) if guidance != 1.0 else None
    shape = (data.CHANNELS, ref.config.frames, ref.config.height, ref.config.width)
    with record_forward_inputs(ref.transformer, device=None, every=every) as calls:
        sampler.sample(ref.transformer, cond, shape, steps=steps, seed=seed, guidance=guidance, uncond=uncond)
    for c in calls:  # one forward per step: index == step (every-th call kept)
        c.step = c.index
    return calls


def reference_sampler_check(ref, plan_path: str | os.PathLike, *, clips: int = 2, steps: int = 8,
                            seed: int = 1) -> dict[str, float]:
    """Sample `clips` held-out clips (seed `seed`, not the calibration seed) with the reference model
    dense and with the plan-lowered graph (run eagerly); PSNR and relative L2 of the final latents,
    and on CUDA the seconds of each sampling run. The whole trajectory counts: errors compound."""
    from vsopt.models import data, sampler

    device = next(ref.transformer.parameters()).device
    _, tokens = data.make_batch(clips, seed)
    cond = ref.encode(tokens.to(device))
    shape = (data.CHANNELS, ref.config.frames, ref.config.height, ref.config.width)
    probe = reference_model_inputs(ref, clips=clips, steps=1, seed=seed)[0]
    signature, (inputs,) = _positional(ref.transformer, [probe])
    with signature.bound(ref.transformer):
        lowered, _ = trace_and_rewrite(ref.transformer, inputs, VsoptConfig(plan=Plan.load(plan_path)))

    def run(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = sampler.sample(fn, cond, shape, steps=steps, seed=seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    dense, dense_s = run(ref.transformer)
    planned, planned_s = run(lambda x, t, c, return_dict=False: lowered(x, t, c))
    result = {"sampler_psnr_db": psnr(planned, dense), "sampler_rel_l2": relative_l2(planned, dense)}
    if device.type == "cuda":
        result.update(sampler_dense_s=dense_s, sampler_lowered_s=planned_s)
    return result


# ----------------------------------------------------------------------------- command line


def _parse_ranges(text: str) -> tuple[tuple[int, int | None], ...]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition(":")
        try:
            out.append((int(a or 0), int(b) if b else None))
        except ValueError:
            raise ConfigError(f"--step-ranges: {part!r} is not START:STOP (e.g. 0:4,4:)") from None
    return tuple(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", help="MODULE:FACTORY; FACTORY() returns (model, inputs), inputs a tuple of "
                                             "positional inputs or a list of such tuples")
    p.add_argument("--reference", action="store_true",
                   help="calibrate the shipped reference model over its sampler steps instead of a FACTORY")
    p.add_argument("--out", required=True, help="plan JSON to write (masks go to a .safetensors file beside it)")
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--max-error", type=float, help="per-site budget: relative L2 of each attention output")
    b.add_argument("--density", type=float, help="overall block density to reach")
    b.add_argument("--speedup", type=float,
                   help="predicted attention speedup over dense to reach (cost model; fixed per-site costs of "
                        "dynamic masks, permutations and launches included); least weighted error under that time")
    b.add_argument("--min-psnr", type=float,
                   help="end-to-end floor: PSNR (dB) of the model output on a held-out input (the last input; "
                        "with --reference a separate sampler run)")
    p.add_argument("--quant", default="none,int8,fp8,int8_fp8",
                   help="precisions the search may use (comma-separated; with --density or --speedup the first is "
                        "used)")
    p.add_argument("--block", type=int, default=64, help="block size (query and key)")
    p.add_argument("--no-reorder", action="store_true", help="keep every head in the model's token order")
    p.add_argument("--no-patterns", action="store_true", help="no static pattern candidates")
    p.add_argument("--no-dynamic", action="store_true", help="no dynamic-mask candidates")
    p.add_argument("--no-skip", action="store_true", help="never skip a head")
    p.add_argument("--error-inputs", type=int, default=None, help="inputs per step range used to measure errors")
    p.add_argument("--site-overhead-us", type=float, default=0.0,
                   help="per-site cost of lowering not in the GPU cost model; sites saving less stay dense")
    p.add_argument("--step-ranges", type=_parse_ranges, default=None,
                   help="calibrate denoising step ranges separately, e.g. 0:4,4: (--reference)")
    p.add_argument("--steps", type=int, default=8, help="--reference: sampler steps")
    p.add_argument("--clips", type=int, default=2, help="--reference: clips sampled for calibration")
    p.add_argument("--device", default=None, help="--reference: device (default cuda if available)")
    p.add_argument("--cost-model", default=None, help="cost-model JSON (default: the shipped one for this GPU)")
    p.add_argument("--grid", default=None, help="F,H,W[,text_before[,text_after]] for sites without an inferred grid")
    p.add_argument("--report", default=None, help="also write the per-site report as JSON here")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint of an interrupted run")
    p.add_argument("--check", action="store_true",
                   help="afterwards run the model with the plan on the first input, as the lowered graph and through "
                        "torch.compile(backend='vsopt'): print the output's error against dense, and times on a GPU")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load_factory(target: str):
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"expected MODULE:FACTORY, got {target!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ModuleNotFoundError as e:
        raise ConfigError(f"cannot import {module_name!r}: {e}") from None
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise ConfigError(f"{target}() must return (model, inputs), got {type(made).__name__}")
    model, inputs = made
    if isinstance(inputs, tuple):
        inputs = [inputs]
    return model, list(inputs)


def run_cli(args: argparse.Namespace) -> int:
    try:
        quants = tuple(Quant(q.strip()) for q in args.quant.split(",") if q.strip())
    except ValueError as e:
        raise ConfigError(f"--quant: {e}; valid: {[q.value for q in Quant]}") from None
    cost = CostModel.load(args.cost_model) if args.cost_model else None
    grid = None
    if args.grid:
        try:
            grid = TokenGrid(*(int(v) for v in args.grid.split(",")))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--grid {args.grid!r}: expected F,H,W[,text_before[,text_after]] ({e})") from None
    if args.reference:
        from vsopt.models import model as model_lib

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        ref = model_lib.load_shipped(device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model = ref.transformer
        inputs = reference_model_inputs(ref, clips=args.clips, steps=args.steps, seed=0)
        held_out = reference_model_inputs(ref, clips=1, steps=args.steps, seed=1)[args.steps // 2] \
            if args.min_psnr is not None else None
    elif args.target:
        model, inputs = _load_factory(args.target)
        held_out = None
        if args.min_psnr is not None:
            if len(inputs) < 2:
                raise ConfigError("--min-psnr needs at least two inputs: the last one is held out")
            held_out = inputs.pop()
    else:
        raise ConfigError("give MODULE:FACTORY or --reference")
    if args.max_error is not None:
        budget = SiteErrorBudget(args.max_error)
    elif args.density is not None:
        budget = DensityBudget(args.density, quants[0] if quants else Quant.NONE)
    elif args.speedup is not None:
        budget = SpeedupBudget(args.speedup, quants[0] if quants else Quant.NONE)
    else:
        budget = QualityFloor(held_out, args.min_psnr)
    options = CalibrationOptions(
        block_m=args.block, block_n=args.block, quants=quants or (Quant.NONE,),
        orders=(TokenOrder.FHW,) if args.no_reorder else tuple(TokenOrder), patterns=not args.no_patterns,
        dynamic=not args.no_dynamic, skip=not args.no_skip, error_inputs=args.error_inputs,
        site_overhead_us=args.site_overhead_us, model_order_candidates=args.speedup is not None,
        step_ranges=args.step_ranges, cost_model=cost)
    result = calibrate(model, inputs, budget, options=options, out=args.out, resume=not args.no_resume,
                       progress=not args.quiet, grid=grid)
    print(result.table())
    print(f"plan written to {args.out}")
    if args.check:
        check = check_plan(model, _as_recorded(inputs[0], 0), args.out, grid)
        if args.reference:
            check.update(reference_sampler_check(ref, args.out, clips=args.clips, steps=args.steps))
        print("plan check on the first input: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()))
        result_dict = result.to_dict()
        result_dict["plan_check"] = check
    else:
        result_dict = result.to_dict()
    if args.report:
        from vsopt.costmodel import atomic_write_text

        atomic_write_text(args.report, json.dumps(result_dict, indent=2) + "\n")
    return 0


class _CallableModule(types.ModuleType):
    """`vsopt.calibrate` is both this module (the CLI imports it) and the function: once the
    module is imported, the package attribute `vsopt.calibrate` is the module, so calling it
    must call calibrate() (as vsopt.inspect does)."""

    def __call__(self, *args, **kwargs) -> CalibrationResult:
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
