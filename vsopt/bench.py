"""vsopt bench: the accuracy-vs-speed trade-off of sparse-attention methods on one model.

Every method turns (the model's attention sites, a target density, a precision) into a Plan, so all
of them run through the same rewrite, the same kernels and the same inputs:

  dense    the exact model (the reference every score is taken against)
  vsopt    vsopt's calibrated plan: per head the best token order (PARO), then per head the
           cheapest of calibrated mask / static pattern / dynamic / skip under a density budget,
           calibrated per denoising step, the budget shared over sites and steps where the final
           output is measured to be most sensitive (vsopt.sensitivity); density is averaged over
           sites, heads and steps
  topk     block top-k of pooled q/k scores in the model's own token order, recomputed at every
           step (the SpargeAttn / XAttention family: keep ceil(d * KB) key blocks per query row
           plus the diagonal; simplification: SpargeAttn's cumulative-mass and similarity filters
           are not modelled, top-k stands for the family)
  window   a fixed 3D local window (sliding tile / NATTEN), radii chosen so that the block
           density is closest to the target
  radial   Radial Attention's static mask (spatial window halving with each doubling of temporal
           distance), parameters chosen for the closest block density
  sage     dense attention with INT8 Q K^T, per-block scales and K smoothing (SageAttention's
           scheme), density 1

For each (method, density) it records: per site, cosine and relative L2 of the attention output
against exact attention on the same q/k/v (isolated: only that site changed), measured at one
denoising step; per sampled clip over the whole trajectory, PSNR, SSIM and relative L2 of the final
latents against the dense sample from the same noise; and speed. Speed is measured on a GPU (the
transformer forward compiled with backend="vsopt" and the plan, against the dense model compiled
the same way); on a machine without one, the speedup shown is the cost model's predicted attention
speedup, and the JSON says so ("speedup_source").

    vsopt bench --methods vsopt,topk,window --densities 0.2,0.3,0.5 --out bench/
writes bench/bench.json and bench/pareto.png (quality against speedup, one curve per method).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.errors import ConfigError
from vsopt.core.ir import AttentionSite, TokenGrid
from vsopt.core.metrics import cosine_similarity, psnr, relative_l2, ssim
from vsopt.core.patterns import LocalWindow, Pattern, Radial, block_mask
from vsopt.core.plan import HeadPlan, Plan, Quant, Sparsity


class Method(str, enum.Enum):
    DENSE = "dense"
    VSOPT = "vsopt"
    TOPK = "topk"
    WINDOW = "window"
    RADIAL = "radial"
    SAGE = "sage"


@dataclass(frozen=True)
class BenchSettings:
    """What one bench run sweeps and how it samples.

    block: kernel block size of every plan. steps / clips / seed: the sampler run the video scores
    come from (the same noise and descriptions for every method). calibration_clips /
    calibration_steps: the sampler inputs vsopt's calibration measures (other seeds than the
    scored clips). site_step: the denoising step whose inputs the per-site errors are taken at.
    step_plans: vsopt calibrates each denoising step separately (a plan with one step range per
    step; the density budget is then shared across steps as well as sites). sensitivity: vsopt's
    density search weighs each site's and step's error by the final output's measured sensitivity
    to it (vsopt.sensitivity), on the calibration clips. vsopt_speedups / vsopt_match: vsopt is
    calibrated under a time budget instead (calibrate.SpeedupBudget: the cost model's predicted
    attention time, fixed per-site costs included) at these predicted speedups of the whole
    model's attention, and with vsopt_match also at each baseline point's predicted speedup; its
    density points are then not run."""

    methods: tuple[Method, ...] = (Method.VSOPT, Method.TOPK, Method.WINDOW, Method.RADIAL, Method.SAGE)
    densities: tuple[float, ...] = (0.2, 0.3, 0.5)
    quant: Quant = Quant.NONE
    block: int = 64
    steps: int = 10
    clips: int = 1
    seed: int = 0
    calibration_clips: int = 1
    calibration_steps: int = 4
    site_step: int | None = None  # None: the middle step
    timing_iters: int = 10
    clip: tuple[int, int, int] | None = None  # latent (frames, height, width); None: the model's own
    step_plans: bool = True
    sensitivity: bool = True
    vsopt_speedups: tuple[float, ...] = ()
    vsopt_match: bool = False

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(Method(m) for m in self.methods))
        object.__setattr__(self, "quant", Quant(self.quant))
        if not all(0.0 < d <= 1.0 for d in self.densities):
            raise ConfigError(f"densities must lie in (0, 1], got {self.densities}")
        object.__setattr__(self, "vsopt_speedups", tuple(float(x) for x in self.vsopt_speedups))
        if not all(x > 0 and math.isfinite(x) for x in self.vsopt_speedups):
            raise ConfigError(f"vsopt_speedups must be finite and > 0, got {self.vsopt_speedups}")
        if self.steps < 1 or self.clips < 1:
            raise ConfigError(f"steps and clips must be >= 1, got {self.steps}, {self.clips}")


@dataclass
class BenchPoint:
    method: str
    target_density: float | None  # None: vsopt calibrated under a time budget (target_speedup)
    density: float  # block density actually run (mean over planned self-attention heads)
    quant: str
    psnr: float
    ssim: float
    rel_l2: float
    site_cosine_min: float
    site_rel_l2_max: float
    sites: dict[str, dict[str, float]]
    speedup: float
    speedup_source: str  # "measured-gpu" or "predicted-cost-model"
    ms: float | None = None
    notes: list[str] = field(default_factory=list)
    target_speedup: float | None = None  # vsopt under a time budget: the whole-model predicted speedup asked


# ----------------------------------------------------------------------------- plans of each method

# vsopt's dynamic candidates in the bench: cumulative-mass shares and top-k fractions spanning the
# swept densities (CalibrationOptions' defaults offer only near-lossless mass shares)
DYNAMIC_MASS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
DYNAMIC_TOP_K = (0.1, 0.2, 0.3, 0.4, 0.5)


def _closest(patterns: Sequence[Pattern], grid: TokenGrid, target: float, block: int) -> tuple[Pattern, float]:
    scored = [(p, float(block_mask(p, grid, block_m=block, block_n=block).float().mean())) for p in patterns]
    return min(scored, key=lambda pd: (abs(pd[1] - target), pd[1]))


def window_pattern(grid: TokenGrid, target: float, block: int) -> tuple[Pattern, float]:
    """The 3D local window with block density closest to `target`."""
    span = max(grid.height, grid.width)
    return _closest([LocalWindow(f, s, s) for f in range(grid.frames) for s in range(span)], grid, target, block)


def radial_pattern(grid: TokenGrid, target: float, block: int) -> tuple[Pattern, float]:
    """The Radial Attention mask with block density closest to `target`."""
    span = max(grid.height, grid.width)
    return _closest([Radial(s, f) for f in range(1, grid.frames + 1) for s in range(span)], grid, target, block)


def method_plan(method: Method, sites: Sequence[AttentionSite], density: float, settings: BenchSettings,
                calibrate_fn=None) -> tuple[Plan, list[str]]:
    """The plan `method` runs at `density`, and notes on how it was made. Only self-attention
    sites with a known grid are made sparse; the rest stay dense (cross-attention to a few text
    tokens is cheap)."""
    video = [s for s in sites if s.is_self_attention and s.grid is not None]
    b, quant = settings.block, settings.quant
    if method is Method.DENSE:
        return Plan.dense(sites), []
    if method is Method.SAGE:
        return Plan.uniform(video, HeadPlan(quant=Quant.INT8, block_m=b, block_n=b)), ["dense INT8 QK"]
    if method is Method.TOPK:
        head = HeadPlan(Sparsity.DYNAMIC, quant=quant, block_m=b, block_n=b,
                        dynamic=DynamicSpec(DynamicMethod.TOP_K, density))
        return Plan.uniform(video, head), [f"top-k {density:.2f} of key blocks per row"]
    if method in (Method.WINDOW, Method.RADIAL):
        grids = {s.grid for s in video}
        if len(grids) != 1:
            raise ConfigError(f"{method.value}: the self-attention sites have several grids {grids}")
        grid = grids.pop()
        pattern, d = (window_pattern if method is Method.WINDOW else radial_pattern)(grid, density, b)
        head = HeadPlan(Sparsity.PATTERN, pattern=pattern, quant=quant, block_m=b, block_n=b)
        return Plan.uniform(video, head), [f"{pattern} (block density {d:.3f})"]
    if method is Method.VSOPT:
        if calibrate_fn is None:
            raise ConfigError("method 'vsopt' needs calibration inputs")
        plan = calibrate_fn(density)
        return plan, [f"calibrated at density budget {density}"]
    raise ConfigError(f"unknown method {method!r}")


def plan_density(plan: Plan, sites: Sequence[AttentionSite], calls: dict | Sequence[dict] | None = None,
                 steps: int | None = None) -> float:
    """Mean block density over the planned heads of self-attention sites: static heads from their
    masks, dense heads 1, skipped heads 0; dynamic heads from the mask they select on the site's
    q/k in `calls` (site_id -> vsopt.capture.SiteCall), or, without calls, at their top-k
    fraction (a cumulative-mass head then raises: its density depends on the input).

    With `steps`, the mean over denoising steps 0 .. steps - 1 of the heads each step runs (a
    plan with step ranges runs different heads at different steps); `calls` is then one dict per
    step (or one dict for all steps). Without, the plan's default heads."""
    if steps is None:
        return _step_density(plan, sites, calls, None)
    per_step = calls if isinstance(calls, (list, tuple)) else [calls] * steps
    return statistics.fmean(_step_density(plan, sites, per_step[i], i) for i in range(steps))


def _step_density(plan: Plan, sites: Sequence[AttentionSite], calls: dict | None, step: int | None) -> float:
    from vsopt.core.dynamic import DynamicMethod, pooled_block_scores, select_blocks
    from vsopt.core.orders import order_permutation
    from vsopt.core.patterns import diagonal_blocks

    ds = []
    for s in sites:
        if s.site_id not in plan or not s.is_self_attention:
            continue
        for h, hp in enumerate(plan[s.site_id].heads_at(step)):
            if hp.sparsity is Sparsity.SKIP:
                ds.append(0.0)
            elif hp.sparsity is Sparsity.DYNAMIC:
                if calls is None:
                    if hp.dynamic.method is not DynamicMethod.TOP_K:
                        raise ConfigError(f"{s.site_id} head {h}: a cumulative-mass head's density needs q/k")
                    ds.append(hp.dynamic.value)
                    continue
                call = calls[s.site_id]
                q, k = call.q[:, h:h + 1], call.k[:, h * call.k.shape[1] // call.q.shape[1]][:, None]
                if hp.order.value != "fhw":
                    perm = order_permutation(s.grid, hp.order).to(q.device)
                    q, k = q[:, :, perm], k[:, :, perm]
                scores = pooled_block_scores(q, k, call.scale, hp.block_m, hp.block_n)
                mask = select_blocks(scores, hp.dynamic, diagonal_blocks(q.shape[2], k.shape[2], hp.block_m, hp.block_n))
                ds.append(float(mask.float().mean()))
            else:
                m = hp.block_mask(s.q_len, s.kv_len, s.grid)
                ds.append(1.0 if m is None else float(m.float().mean()))
    return statistics.fmean(ds) if ds else 1.0


# ----------------------------------------------------------------------------- running a plan


class _Velocity(torch.nn.Module):
    """Wan's forward with positional inputs only, returning the velocity tensor."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, timestep, encoder_hidden_states):
        return self.transformer(latents, timestep, encoder_hidden_states, return_dict=False)[0]


def _rewritten(model: _Velocity, example: tuple, plan: Plan | None, grid: TokenGrid | None):
    from vsopt.backend import trace_and_rewrite

    gm, report = trace_and_rewrite(model, example, VsoptConfig(plan=plan, grid=grid))
    return gm, report


def _as_sampler_model(fn):
    return lambda x, t, c, return_dict=False: (fn(x, t, c),)


class PlanScorer:
    """Scores plans against the dense model on fixed clips: the same descriptions and noise for
    every plan, so that scores compare across plans and runs.

    Built once per (model, settings): it samples the dense clips, records the transformer's inputs
    at settings.site_step and each attention site's exact q/k/v/output there. score(plan) then
    samples with the plan and measures video and per-site errors (see the module doc)."""

    def __init__(self, ref, settings: BenchSettings, progress: bool = False):
        from vsopt.capture import record_forward_inputs, run_observing
        from vsopt.models import data, sampler

        self.ref, self.settings = ref, settings
        self.device = next(ref.transformer.parameters()).device
        self.shape = (data.CHANNELS, *(settings.clip or (ref.config.frames, ref.config.height, ref.config.width)))
        _, tokens = data.make_batch(settings.clips, seed=settings.seed + 1000)
        self.cond = ref.encode(tokens.to(self.device))
        # every method traces this wrapper, so that site ids (and plans) agree across methods
        self.velocity = _Velocity(ref.transformer).eval()
        self.example = (torch.randn(1, *self.shape, device=self.device, dtype=self.cond.dtype),
                        torch.tensor([500.0], device=self.device), self.cond[:1])
        dense_gm, report = _rewritten(self.velocity, self.example, None, None)
        self.sites = report.sites
        self.site_step = settings.site_step if settings.site_step is not None else settings.steps // 2
        t0 = time.perf_counter()
        with record_forward_inputs(ref.transformer, device=None) as recorded:
            self.dense_video = sampler.sample(ref.transformer, self.cond, self.shape, steps=settings.steps,
                                              seed=settings.seed, progress=progress)
        self.dense_sample_s = time.perf_counter() - t0
        # every site's exact q/k/v/output at every step (per-site errors, dynamic heads' density)
        self.dense_calls_by_step = []
        for rec in recorded:
            calls: dict = {}
            run_observing(dense_gm, tuple(a[:1] for a in rec.args), lambda call: calls.__setitem__(call.site_id, call))
            self.dense_calls_by_step.append(calls)
        self.dense_calls = self.dense_calls_by_step[self.site_step]
        self._calibration_inputs = None
        self._error_weights = None

    def score(self, plan: Plan) -> dict[str, Any]:
        """Video scores (PSNR, SSIM, relative L2 of the final latents against dense), per-site
        isolated errors at site_step, and the block density run."""
        from vsopt.calibrate import site_plan_output
        from vsopt.models import sampler

        video = sampler.sample(self._step_model(plan), self.cond, self.shape, steps=self.settings.steps,
                               seed=self.settings.seed)
        per_site = {}
        for site in self.sites:
            call = self.dense_calls[site.site_id]
            out = (site_plan_output(site, plan[site.site_id].heads_at(self.site_step), call)
                   if site.site_id in plan else call.out.float())
            per_site[site.site_id] = {"cosine": cosine_similarity(out, call.out), "rel_l2": relative_l2(out, call.out)}
        return {"psnr": psnr(video, self.dense_video), "ssim": ssim(video, self.dense_video),
                "rel_l2": relative_l2(video, self.dense_video),
                "density": plan_density(plan, self.sites, self.dense_calls_by_step, self.settings.steps),
                "site_cosine_min": min(v["cosine"] for v in per_site.values()),
                "site_rel_l2_max": max(v["rel_l2"] for v in per_site.values()), "sites": per_site}

    def _step_model(self, plan: Plan):
        """A sampler model running `plan`: the lowered graph of the current denoising step's
        segment when the plan has step ranges (as the backend's step dispatch does)."""
        from vsopt.core.dynamic import current_denoising_step

        if not plan.step_boundaries():
            return _as_sampler_model(_rewritten(self.velocity, self.example, plan, None)[0])
        graphs = {start: _rewritten(self.velocity, self.example, plan.at_step(start), None)[0]
                  for start in (None, 0, *plan.step_boundaries())}

        def run(x, t, c, return_dict=False):
            return (graphs[plan.segment_start(current_denoising_step())](x, t, c),)

        return run

    def calibrated_plan(self, density: float) -> Plan:
        """vsopt's calibration under DensityBudget(density), on other clips than the scored ones:
        with settings.step_plans one step range per calibration step, with settings.sensitivity
        the errors weighted by the final output's sensitivity (measured on the calibration run)."""
        from vsopt.calibrate import DensityBudget, calibrate

        calls, options = self._calibration(density)
        return calibrate(self.velocity, calls, DensityBudget(density, self.settings.quant), options=options,
                         progress=False).plan

    def calibrated_plans_at_speedups(self, speedups: Sequence[float], cost) -> list[tuple[Plan, float]]:
        """vsopt's calibration under SpeedupBudget at each whole-model predicted attention speedup
        in `speedups` (one measurement, one search per target), as (plan, the speedup asked of the
        calibrated sites): the sites left dense (cross-attention) count at their dense time, so the
        calibrated self-attention sites must be faster than the whole. Every sparse candidate is
        also offered in the model's token order, so the search can drop a permutation."""
        from vsopt.calibrate import SpeedupBudget, calibrate_many

        calls, options = self._calibration(0.3)
        options = dataclasses.replace(options, model_order_candidates=True)
        targets = [_calibrated_sites_target(x, self.sites, cost) for x in speedups]
        if not all(math.isfinite(t) for t in targets):
            raise ConfigError(f"vsopt speedups {list(speedups)}: the sites left dense alone take longer than "
                              f"that (predicted); the largest reachable is below "
                              f"{max(x for x, t in zip(speedups, targets) if not math.isfinite(t)):g}x")
        results = calibrate_many(self.velocity, calls, [SpeedupBudget(t, self.settings.quant) for t in targets],
                                 options=options, progress=False)
        return [(r.plan, t) for r, t in zip(results, targets)]

    def _calibration(self, order_density: float):
        """The calibration inputs (a sampler run on other clips) and options of the bench."""
        from vsopt.calibrate import CalibrationOptions
        from vsopt.capture import RecordedCall, record_forward_inputs
        from vsopt.models import data, sampler

        s = self.settings
        if self._calibration_inputs is None:
            _, tokens = data.make_batch(s.calibration_clips, seed=s.seed + 2000)
            with record_forward_inputs(self.ref.transformer, device=None) as calls:
                sampler.sample(self.ref.transformer, self.ref.encode(tokens.to(self.device)), self.shape,
                               steps=s.calibration_steps, seed=s.seed + 1)
            # one forward per step; the _Velocity wrapper takes the positional inputs only
            self._calibration_inputs = [RecordedCall(c.index, c.index, c.args) for c in calls]
        calls = self._calibration_inputs
        if s.sensitivity and self._error_weights is None:
            self._error_weights = self.sensitivity_weights(calls)
        ranges = None
        if s.step_plans:
            ranges = tuple((i, i + 1) for i in range(s.calibration_steps - 1)) + ((s.calibration_steps - 1, None),)
        options = CalibrationOptions(block_m=s.block, block_n=s.block, quants=tuple({Quant.NONE, s.quant}),
                                     order_density=order_density, step_ranges=ranges, dynamic_values=DYNAMIC_MASS,
                                     dynamic_top_k=DYNAMIC_TOP_K,
                                     error_weights=self._error_weights if s.sensitivity else None)
        return calls, options

    def sensitivity_weights(self, calls) -> dict[str, dict[int, float]]:
        """vsopt.sensitivity.euler_sensitivity on a dense sampler run's recorded inputs `calls`
        (one per step), each self-attention site probed with block top-k at density 0.5 in the
        model's order (an error of the kind sparse attention makes)."""
        from vsopt.calibrate import site_plan_output
        from vsopt.models import sampler
        from vsopt.sensitivity import euler_sensitivity

        inputs = [c.args for c in calls]
        gm, _ = _rewritten(self.velocity, inputs[0], None, None)
        b = self.settings.block
        probe_head = HeadPlan(Sparsity.DYNAMIC, block_m=b, block_n=b, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.5))
        video = {s.site_id: s for s in self.sites if s.is_self_attention and s.grid is not None}

        def probe(call):
            return site_plan_output(video[call.site_id], [probe_head] * call.q.shape[1], call)

        with torch.no_grad():
            return euler_sensitivity(gm, self.velocity, inputs, sampler.sigmas(len(inputs)), list(video), probe)


def bench(ref, settings: BenchSettings | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Sweep `settings` on a vsopt.models.ReferenceModel (or any object with .transformer, .encode
    and .config with frames/height/width); returns the JSON-ready result (see the module doc)."""
    from vsopt.costmodel import CostModel

    settings = settings or BenchSettings()
    scorer = PlanScorer(ref, settings, progress=progress)
    on_gpu = scorer.device.type == "cuda"
    cost = CostModel.default(torch.cuda.get_device_name() if on_gpu else None)
    dense_ms = _forward_ms(scorer.velocity, scorer.example, None, settings) if on_gpu else None

    points: list[BenchPoint] = []
    by_time = Method.VSOPT in settings.methods and (settings.vsopt_speedups or settings.vsopt_match)
    configs = [(m, d) for m in settings.methods if not (by_time and m is Method.VSOPT)
               for d in (settings.densities if m is not Method.SAGE else (1.0,))]
    iterator = configs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(configs, desc="bench", unit="config")

    def add(method, density, plan, notes, target_speedup=None):
        scores = scorer.score(plan)
        if on_gpu:
            ms = _forward_ms(scorer.velocity, scorer.example, plan, settings)
            speedup, source = dense_ms / ms, "measured-gpu"
        else:
            speedup = _predicted_attention_speedup(plan, scorer.sites, cost, settings.steps)
            ms, source = None, "predicted-cost-model"
        points.append(BenchPoint(
            method=method.value, target_density=density, density=scores["density"],
            quant=(Quant.INT8 if method is Method.SAGE else settings.quant).value,
            psnr=scores["psnr"], ssim=scores["ssim"], rel_l2=scores["rel_l2"],
            site_cosine_min=scores["site_cosine_min"], site_rel_l2_max=scores["site_rel_l2_max"],
            sites=scores["sites"], speedup=speedup, speedup_source=source, ms=ms, notes=notes,
            target_speedup=target_speedup))

    for method, density in iterator:
        plan, notes = method_plan(method, scorer.sites, density, settings, scorer.calibrated_plan)
        add(method, density, plan, notes)
    if by_time:
        # the baselines' PREDICTED speedups (on a GPU too: the time budget is the cost model's)
        targets = list(settings.vsopt_speedups)
        if settings.vsopt_match:
            targets += [_predicted_attention_speedup(method_plan(Method(p.method), scorer.sites, p.target_density,
                                                                 settings)[0], scorer.sites, cost, settings.steps)
                        for p in points if p.method in (Method.TOPK.value, Method.WINDOW.value, Method.RADIAL.value)]
        targets = sorted(set(round(t, 4) for t in targets))
        for target, (plan, site_target) in zip(targets, scorer.calibrated_plans_at_speedups(targets, cost)):
            add(Method.VSOPT, None, plan, [f"calibrated at predicted speedup {target:g}x (calibrated sites "
                                           f"{site_target:.3g}x)"], target_speedup=target)
    return {
        "benchmark": "vsopt-bench", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
        "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=lambda v: v.value)),
        "model": {"latent_clip": list(scorer.shape[1:]), "sites": [s.site_id for s in scorer.sites]},
        "dense_ms": dense_ms, "dense_sample_s": scorer.dense_sample_s,
        "points": [dataclasses.asdict(p) for p in points],
    }


def _predicted_attention_speedup(plan: Plan, sites: Sequence[AttentionSite], cost, steps: int | None = None) -> float:
    """Dense over planned attention time of all sites, from the cost model (no GPU here); with
    `steps`, summed over denoising steps 0 .. steps - 1 (each runs its step range's heads)."""
    if steps is None:
        return _predicted_step_speedup(plan, sites, cost, None)
    # total time over steps = sum of per-step times: the harmonic mean of per-step speedups
    return steps / sum(1.0 / _predicted_step_speedup(plan, sites, cost, i) for i in range(steps))


def _calibrated_sites_target(speedup: float, sites: Sequence[AttentionSite], cost) -> float:
    """The predicted speedup the self-attention sites (those vsopt calibrates) must reach for the
    whole model's attention to reach `speedup`, the other sites staying dense (inf: unreachable,
    the dense sites alone take longer than the whole may)."""
    dense_all = sum(_dense_site_us(s, cost) for s in sites)
    dense_video = sum(_dense_site_us(s, cost) for s in sites if s.is_self_attention and s.grid is not None)
    allowed = dense_all / speedup - (dense_all - dense_video)
    return dense_video / allowed if allowed > 0 else math.inf


def _dense_site_us(s: AttentionSite, cost) -> float:
    from vsopt.costmodel import Launch, SiteWork

    qb, kb = math.ceil(s.q_len / 64), math.ceil(s.kv_len / 64)
    return cost.predict_us(SiteWork((Launch("none", s.head_dim, 64, 64, s.batch * s.heads * qb,
                                            s.batch * s.heads * qb * kb),)))


def _predicted_step_speedup(plan: Plan, sites: Sequence[AttentionSite], cost, step: int | None) -> float:
    from vsopt.core.orders import TokenOrder
    from vsopt.costmodel import Launch, SiteWork

    dense = planned = 0.0
    for s in sites:
        qb, kb = math.ceil(s.q_len / 64), math.ceil(s.kv_len / 64)
        full = s.batch * s.heads * qb * kb
        dense_work = SiteWork((Launch("none", s.head_dim, 64, 64, s.batch * s.heads * qb, full),))
        dense += cost.predict_us(dense_work)
        if s.site_id not in plan:
            planned += cost.predict_us(dense_work)
            continue
        heads = plan[s.site_id].heads_at(step)
        launches: dict[tuple, list[int]] = {}
        scored = permuted = 0
        for h in heads:
            if h.sparsity is Sparsity.SKIP:
                continue
            if h.order is not TokenOrder.FHW and h.sparsity is not Sparsity.DENSE:
                permuted += 1  # q, k, v reordered in, the output back (as calibrate charges it)
            hq, hk = math.ceil(s.q_len / h.block_m), math.ceil(s.kv_len / h.block_n)
            if h.sparsity is Sparsity.DYNAMIC:
                visited = round(h.dynamic.value * hq * hk)
                scored += hq * hk
            else:
                m = h.block_mask(s.q_len, s.kv_len, s.grid)
                visited = hq * hk if m is None else int(m.sum())
            key = (h.quant.value, h.block_m, h.block_n)
            acc = launches.setdefault(key, [0, 0])
            acc[0] += s.batch * hq
            acc[1] += s.batch * visited
        permute_mib = 4 * s.batch * s.q_len * s.head_dim * s.dtype.itemsize * permuted / 2**20
        work = SiteWork(tuple(Launch(q, s.head_dim, bm, bn, a[0], a[1]) for (q, bm, bn), a in launches.items()),
                        permute_mib, s.batch * scored)
        planned += cost.predict_us(work) if launches else 0.0
    return dense / max(planned, 1e-9)


def _forward_ms(velocity, example, plan, settings: BenchSettings) -> float:
    """Median ms of one compiled forward of the _Velocity wrapper (GPU), backend vsopt with `plan`."""
    import torch._dynamo

    from vsopt.timing import median_ms

    torch._dynamo.reset()
    compiled = torch.compile(velocity, backend="vsopt", options={"plan": plan} if plan is not None else {},
                             dynamic=False)
    with torch.no_grad():
        return median_ms(lambda: compiled(*example), settings.timing_iters, warmup=3, cuda=True)


# ----------------------------------------------------------------------------- output


def pareto_front(points: Sequence[dict], quality: str = "psnr") -> list[dict]:
    """Points no other point beats in both speedup and quality, by increasing speedup."""
    front = []
    for p in sorted(points, key=lambda p: (-p["speedup"], -p[quality])):
        if not front or p[quality] > front[-1][quality]:
            front.append(p)
    return sorted(front, key=lambda p: p["speedup"])


def plot_pareto(result: dict, path: str | os.PathLike, quality: str = "psnr") -> Path:
    """Two panels, one curve per method: quality (PSNR by default) against the block density run
    (measured), and against the speedup over dense (measured on a GPU, or the cost model's
    prediction; the axis label says which). Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    by_method: dict[str, list[dict]] = {}
    for p in result["points"]:
        by_method.setdefault(p["method"], []).append(p)
    cap = 60.0 if quality == "psnr" else math.inf
    for ax, x in zip(axes, ("density", "speedup")):
        for method, pts in sorted(by_method.items()):
            pts = sorted(pts, key=lambda p: p[x])
            ax.plot([p[x] for p in pts], [min(p[quality], cap) for p in pts], marker="o", label=method)
        ax.grid(alpha=0.3)
        ax.set_ylabel(f"{quality.upper()} vs dense" + (" (dB, capped at 60)" if quality == "psnr" else ""))
    axes[0].set_xlabel("block density run (lower = sparser)")
    axes[0].invert_xaxis()
    source = ", ".join(sorted({p["speedup_source"] for p in result["points"]}))
    axes[1].set_xlabel(f"speedup over dense ({source})")
    axes[0].legend()
    clip = "x".join(str(v) for v in result["model"]["latent_clip"])
    fig.suptitle(f"vsopt bench: reference model, latent clip {clip}, {result['settings']['steps']} steps, "
                 f"{result['device']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_json(result: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=True))
    os.replace(tmp, path)
    return path


def summary_table(result: dict) -> str:
    lines = [f"{'method':<8} {'density':>7} {'quant':<6} {'PSNR':>6} {'SSIM':>6} {'relL2':>7} {'site cos':>8} "
             f"{'speedup':>7}"]
    for p in result["points"]:
        lines.append(f"{p['method']:<8} {p['density']:>7.3f} {p['quant']:<6} {min(p['psnr'], 99):>6.2f} "
                     f"{p['ssim']:>6.4f} {p['rel_l2']:>7.4f} {p['site_cosine_min']:>8.4f} {p['speedup']:>6.2f}x")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="vsopt,topk,window,radial,sage",
                   help=f"comma-separated, from {[m.value for m in Method if m is not Method.DENSE]}")
    p.add_argument("--densities", default="0.2,0.3,0.5", help="comma-separated block densities in (0, 1]")
    p.add_argument("--quant", default="none", choices=[q.value for q in Quant], help="precision of sparse methods")
    p.add_argument("--steps", type=int, default=10, help="sampler steps per clip")
    p.add_argument("--clips", type=int, default=1, help="clips sampled per configuration")
    p.add_argument("--block", type=int, default=64, help="kernel block size")
    p.add_argument("--clip", default=None, help="latent clip F,H,W (default: the size the model was trained on)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="bench", help="output folder for bench.json and pareto.png")
    p.add_argument("--no-step-plans", action="store_true", help="vsopt: one plan for all steps (no step ranges)")
    p.add_argument("--vsopt-speedups", default=None,
                   help="vsopt: calibrate under a time budget (the cost model's predicted attention speedup over "
                        "dense, fixed costs of dynamic masks and permutations included) at these speedups instead "
                        "of at --densities; comma-separated numbers, 'match' = at each baseline point's predicted "
                        "speedup (e.g. 1.1,1.3,match)")
    p.add_argument("--no-sensitivity", action="store_true",
                   help="vsopt: weigh every site's and step's error alike (no measured output sensitivity)")


def run_cli(args: argparse.Namespace) -> int:
    from vsopt.models.model import load_shipped

    try:
        methods = tuple(Method(m.strip()) for m in args.methods.split(",") if m.strip())
        densities = tuple(float(d) for d in args.densities.split(",") if d.strip())
        clip = tuple(int(v) for v in args.clip.split(",")) if args.clip else None
        speed = [v.strip() for v in (args.vsopt_speedups or "").split(",") if v.strip()]
        vsopt_speedups = tuple(float(v) for v in speed if v != "match")
    except ValueError as e:
        raise ConfigError(f"bad --methods, --densities, --clip or --vsopt-speedups: {e}") from None
    if clip is not None and len(clip) != 3:
        raise ConfigError(f"--clip needs F,H,W, got {args.clip!r}")
    settings = BenchSettings(methods=methods, densities=densities, quant=Quant(args.quant), block=args.block,
                             steps=args.steps, clips=args.clips, clip=clip, step_plans=not args.no_step_plans,
                             sensitivity=not args.no_sensitivity, vsopt_speedups=vsopt_speedups,
                             vsopt_match="match" in speed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = load_shipped(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    result = bench(ref, settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "bench.json")
    plot_pareto(result, out / "pareto.png")
    print(summary_table(result))
    print(f"wrote {out / 'bench.json'} and {out / 'pareto.png'}")
    return 0
