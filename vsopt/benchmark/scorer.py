"""PlanScorer: scores plans against the dense model on fixed clips (the same descriptions and
noise for every plan, so that scores compare across plans and runs), and makes vsopt's calibrated
plans on other clips."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Sequence

import torch

from vsopt.benchmark.aggregate import calibrated_sites_target, plan_density
from vsopt.benchmark.settings import DYNAMIC_MASS, BenchSettings
from vsopt.core import semantics
from vsopt.core.config import VsoptConfig
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.metrics import cosine_similarity, psnr, relative_l2, ssim
from vsopt.core.plan import HeadPlan, Plan, Quant
from vsopt.core.steps import step_variants


class Velocity(torch.nn.Module):
    """Wan's forward with positional inputs only, returning the velocity tensor."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, timestep, encoder_hidden_states):
        return self.transformer(latents, timestep, encoder_hidden_states, return_dict=False)[0]


def rewritten(model: Velocity, example: tuple, plan: Plan | None, grid: TokenGrid | None):
    """(graph, PipelineReport) of the model traced on `example` and rewritten for `plan`."""
    from vsopt.backend import trace_and_rewrite

    return trace_and_rewrite(model, example, VsoptConfig(plan=plan, grid=grid))


def _as_sampler_model(fn):
    return lambda x, t, c, return_dict=False: (fn(x, t, c),)


def site_output(site, heads: Sequence[HeadPlan], call) -> torch.Tensor:
    """What `site` computes under `heads` on a recorded call's q/k/v (semantics.site_output)."""
    return semantics.site_output(site, heads, call.q, call.k, call.v, call.scale, softcap=call.softcap)


def calibration_step_ranges(steps: int, renorm: Sequence[int] = ()) -> tuple[tuple[int, int | None], ...] | None:
    """vsopt's step plans over a calibration run of `steps` steps: one range per step; with
    Re-ttention (or residual sharing) intervals on offer (a correction needs its measuring step in its own range, and
    measures at the range's first step), step 0, then ranges of the longest interval R from step
    1 ((1, 1 + R), (1 + R, 1 + 2R), ...: each measures at its start, as one range from step 1
    would, and the search still places blocks per segment), the last one to the end. None for a
    one-step run with intervals (nothing to correct)."""
    if not renorm:
        return tuple((i, i + 1) for i in range(steps - 1)) + ((steps - 1, None),)
    if steps < 2:
        return None
    r = max(renorm)
    starts = [0, *range(1, steps, r)]
    return tuple((a, b) for a, b in zip(starts, [*starts[1:], None]))


class PlanScorer:
    """Built once per (model, settings): it samples the dense clips, records the transformer's
    inputs at every step and each attention site's exact q/k/v/output there. score(plan) then
    samples with the plan and measures video and per-site errors (see the package doc)."""

    def __init__(self, ref, settings: BenchSettings, progress: bool = False):
        from vsopt.calibration.capture import record_forward_inputs, run_observing
        from vsopt.models import data, sampler

        self.ref, self.settings = ref, settings
        self.device = next(ref.transformer.parameters()).device
        self.shape = (data.CHANNELS, *(settings.clip or (ref.config.frames, ref.config.height, ref.config.width)))
        _, tokens = data.make_batch(settings.clips, seed=settings.seed + 1000)
        self.cond = ref.encode(tokens.to(self.device))
        # every method traces this wrapper, so that site ids (and plans) agree across methods
        self.velocity = Velocity(ref.transformer).eval()
        self.example = (torch.randn(1, *self.shape, device=self.device, dtype=self.cond.dtype),
                        torch.tensor([500.0], device=self.device), self.cond[:1])
        dense_gm, report = rewritten(self.velocity, self.example, None, None)
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
        self._probe = None  # the sensitivity probe's head (None: sampler_sensitivity's default)
        self._density_plans: dict[float, Plan] = {}
        self._last_model = None  # (plan, its sampler model): the last one built

    # what the dense clips, the calibration inputs and the sensitivity weights depend on
    _SHARED = ("steps", "clips", "seed", "clip", "block", "site_step", "calibration_steps", "calibration_clips",
               "sensitivity", "vsopt_held_out", "vsopt_probe")

    def with_settings(self, settings: BenchSettings) -> "PlanScorer":
        """A scorer for other vsopt calibration options (settings differing from this one's only
        in fields outside _SHARED) that shares this one's dense clips, recorded calls,
        calibration inputs and sensitivity weights, with no calibrated plan yet: an ablation of
        the options pays the dense sampling and the sensitivity measurement once."""
        differ = [f for f in self._SHARED if getattr(settings, f) != getattr(self.settings, f)]
        if differ:
            raise ConfigError(f"with_settings: {differ} differ from the scorer's; build a new PlanScorer")
        other = copy.copy(self)
        other.settings, other._density_plans, other._last_model = settings, {}, None
        return other

    def score(self, plan: Plan) -> dict[str, Any]:
        """Video scores (PSNR, SSIM, relative L2 of the final latents against dense), per-site
        isolated errors at site_step, and the block density run."""
        from vsopt.models import sampler

        video = sampler.sample(self.step_model(plan), self.cond, self.shape, steps=self.settings.steps,
                               seed=self.settings.seed)
        per_site = {}
        for site in self.sites:
            call = self.dense_calls[site.site_id]
            out = (site_output(site, plan[site.site_id].heads_at(self.site_step), call)
                   if site.site_id in plan else call.out.float())
            per_site[site.site_id] = {"cosine": cosine_similarity(out, call.out), "rel_l2": relative_l2(out, call.out)}
        return {"psnr": psnr(video, self.dense_video), "ssim": ssim(video, self.dense_video),
                "rel_l2": relative_l2(video, self.dense_video),
                "density": plan_density(plan, self.sites, self.dense_calls_by_step, self.settings.steps),
                "site_cosine_min": min(v["cosine"] for v in per_site.values()),
                "site_rel_l2_max": max(v["rel_l2"] for v in per_site.values()), "sites": per_site}

    def step_model(self, plan: Plan):
        """A sampler model running `plan`: the lowered graph of the current denoising step's
        segment when the plan has step ranges (vsopt.core.steps, as the backend dispatches)."""
        if self._last_model is not None and self._last_model[0] is plan:  # score, then time, the same plan
            return self._last_model[1]
        if plan is None:  # the traced model's own graph
            model = _as_sampler_model(rewritten(self.velocity, self.example, None, None)[0])
        else:
            model = _as_sampler_model(step_variants(plan, lambda p: rewritten(self.velocity, self.example, p, None)[0]))
        self._last_model = (plan, model)
        return model

    def calibrated_plan(self, density: float) -> Plan:
        """vsopt's calibration under DensityBudget(density), on other clips than the scored ones:
        with settings.step_plans one step range per calibration step, with settings.sensitivity
        the errors weighted by the final output's sensitivity (measured on the calibration run).
        A density calibrated_plans made already is returned as it is."""
        if density not in self._density_plans:
            self.calibrated_plans([density])
        return self._density_plans[density]

    def calibrated_plans(self, densities: Sequence[float]) -> dict[float, Plan]:
        """calibrated_plan of each density, those not made yet from ONE calibration (calibrate_many:
        one measurement, one search per density; token orders compared at the lowest density)."""
        from vsopt.calibration import DensityBudget, calibrate_many

        todo = sorted(set(densities) - set(self._density_plans))
        if todo:
            calls, options = self._calibration(min(todo))
            results = calibrate_many(self.velocity, calls, [DensityBudget(d, self.settings.quant) for d in todo],
                                     options=options, progress=False)
            self._density_plans.update({d: r.plan for d, r in zip(todo, results)})
        return {d: self._density_plans[d] for d in densities}

    def has_calibrated(self, density: float) -> bool:
        """Whether calibrated_plan(density) is made already (the calibration of every density ran)."""
        return density in self._density_plans

    def calibrated_plans_at_speedups(self, speedups: Sequence[float], cost) -> list[tuple[Plan, float]]:
        """vsopt's calibration under SpeedupBudget at each whole-model predicted attention speedup
        in `speedups` (one measurement, one search per target), as (plan, the speedup asked of the
        calibrated sites): the sites left dense (cross-attention) count at their dense time, so the
        calibrated self-attention sites must be faster than the whole. Every sparse candidate is
        also offered in the model's token order, so the search can drop a permutation."""
        from vsopt.calibration import SpeedupBudget, calibrate_many

        calls, options = self._calibration(0.3)
        options = dataclasses.replace(options, model_order_candidates=True)
        targets = [calibrated_sites_target(x, self.sites, cost) for x in speedups]
        if not all(math.isfinite(t) for t in targets):
            raise ConfigError(f"vsopt speedups {list(speedups)}: the sites left dense alone take longer than "
                              f"that (predicted); the largest reachable is below "
                              f"{max(x for x, t in zip(speedups, targets) if not math.isfinite(t)):g}x")
        results = calibrate_many(self.velocity, calls, [SpeedupBudget(t, self.settings.quant) for t in targets],
                                 options=options, progress=False)
        return [(r.plan, t) for r, t in zip(results, targets)]

    def _calibration(self, order_density: float):
        """The calibration inputs (a sampler run on other clips) and options of the bench."""
        from vsopt.calibration import CalibrationOptions
        from vsopt.calibration.capture import RecordedCall, record_forward_inputs
        from vsopt.calibration.search_flags import search_fields
        from vsopt.calibration.sensitivity import probe_text, sensitivity_probe
        from vsopt.models import data, sampler

        s = self.settings
        if self._calibration_inputs is None:
            self._calibration_inputs = []
            # vsopt_held_out: a second sampler run (other descriptions and noise) for pass 2's errors
            for run in range(2 if s.vsopt_held_out else 1):
                _, tokens = data.make_batch(s.calibration_clips, seed=s.seed + 2000 + 7 * run)
                with record_forward_inputs(self.ref.transformer, device=None) as calls:
                    sampler.sample(self.ref.transformer, self.ref.encode(tokens.to(self.device)), self.shape,
                                   steps=s.calibration_steps, seed=s.seed + 1 + 7 * run)
                # one forward per step; the Velocity wrapper takes the positional inputs only
                n = len(self._calibration_inputs)
                self._calibration_inputs += [RecordedCall(n + c.index, c.index, c.args) for c in calls]
        calls = self._calibration_inputs
        if s.sensitivity and self._error_weights is None:  # measured on the first run
            self._probe = sensitivity_probe(s.block, order_density, pooled=True) if s.vsopt_probe else None
            self._error_weights = self.sensitivity_weights(calls[:s.calibration_steps], self._probe)
        ranges = calibration_step_ranges(s.calibration_steps, s.vsopt_renorm + s.vsopt_residual) \
            if s.step_plans else None
        options = CalibrationOptions(block_m=s.block, block_n=s.block, quants=tuple({Quant.NONE, s.quant}),
                                     order_density=order_density, step_ranges=ranges,
                                     **search_fields(pooled=s.vsopt_pooled, renorm=s.vsopt_renorm,
                                                     residual=s.vsopt_residual,
                                                     warmup=tuple(k for k in s.vsopt_warmup if k < s.calibration_steps)
                                                     if s.step_plans else (),
                                                     refresh=s.vsopt_refresh, top_k=s.vsopt_top_k,
                                                     dynamic_values=DYNAMIC_MASS, held_out=s.vsopt_held_out,
                                                     error_weights=self._error_weights if s.sensitivity else None,
                                                     error_weights_probe=probe_text(self._probe)
                                                     if s.sensitivity else None,
                                                     clusters=self._cluster_candidates()))
        return calls, options

    def _cluster_candidates(self):
        """vsopt_clusters: the cluster method's specs at each of vsopt_cluster_top_p (one cluster
        count for every site: the smallest site's), for the calibration to choose per head."""
        from vsopt.calibration.clusters import cluster_candidates

        s = self.settings
        if not s.vsopt_clusters:
            return ()
        video = [x for x in self.sites if x.is_self_attention and x.grid is not None]
        return cluster_candidates(video, s.block, s.vsopt_cluster_top_p, s.cluster_clusters, s.cluster_refresh)

    def sensitivity_weights(self, calls, probe_head: HeadPlan | None = None) -> dict[str, dict[int, float]]:
        """vsopt.calibration.sensitivity.sampler_sensitivity on a dense sampler run's recorded
        inputs `calls` (one per step), each calibrated site probed with `probe_head` on every head
        (None: its default, block top-k at density 0.5 in the model's order)."""
        from vsopt.calibration.sensitivity import sampler_sensitivity

        return sampler_sensitivity(self.velocity, [c.args for c in calls], self.settings.block, probe_head)
