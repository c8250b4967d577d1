"""Calibration: measure a model's attention and search, per head, for the fastest plan that keeps
the accuracy budget.

    result = vsopt.calibrate(model, calibration_inputs, budget=SiteErrorBudget(0.05), out="m.plan.json")
    result.plan        # vsopt.core.plan.Plan, also written to `out`
    print(result.table())   # per site: predicted and actual error, density, predicted time

The model is traced and rewritten once (vsopt.backend.trace_and_rewrite, no plan); then three
passes over the calibration inputs, each running that graph eagerly and looking at every
attention site as it runs (capture.run_observing):

1. measure (measure.measure_mass): per site and head, the exact block attention mass in each
   token order; each head gets its order and its candidates (measure.build_candidates).
2. errors (measure.measure_errors): every candidate and precision on the site's real q/k/v,
   squared error per head against exact float32 attention.
3. search and check: per site (SiteErrorBudget) or over the model (DensityBudget, SpeedupBudget)
   a Lagrangian search (search.py) picks one (candidate, quant) per head; the chosen plan
   (result.assemble) is run on the first input of each step range and its ACTUAL error per site
   is reported beside the predicted one. A QualityFloor repeats the search with per-site budgets
   found by bisection until the model output on the held-out input passes.

The sums of passes 1 and 2 are checkpointed next to the output plan (checkpoint.py): an
interrupted calibration resumes where it stopped.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from vsopt.backend import trace_and_rewrite
from vsopt.calibration.budgets import BUDGET_TYPES, Budget, QualityFloor, QualityMetric, SiteErrorBudget, budget_text
from vsopt.calibration.capture import RecordedCall, SiteCall, run_observing
from vsopt.calibration.checkpoint import Checkpoint, fingerprint
from vsopt.calibration.failures import step_failed
from vsopt.calibration.inputs import Signature, as_recorded, model_output, positional, range_of
from vsopt.calibration.measure import SiteState, build_candidates, calibratable, exact_attention, measure_errors, \
    measure_mass
from vsopt.calibration.options import CalibrationOptions
from vsopt.calibration.order_choice import site_orders
from vsopt.calibration.result import CalibrationResult, SiteResult, assemble
from vsopt.calibration.reuse import measurable_intervals
from vsopt.calibration.search import decide
from vsopt.calibration.warmup import decide_with_warmup
from vsopt.core.config import VsoptConfig
from vsopt.core.costmodel import CostModel
from vsopt.core.errors import ConfigError, VsoptError
from vsopt.core.ir import TokenGrid
from vsopt.core.metrics import psnr, relative_l2
from vsopt.core.plan import Plan
from vsopt.core.semantics import site_output


def calibrate(model: torch.nn.Module, calibration_inputs: Sequence[Any], budget: Budget, *,
              options: CalibrationOptions | None = None, out: str | os.PathLike | None = None, resume: bool = True,
              progress: bool = True, grid: TokenGrid | None = None,
              grids: dict[str, TokenGrid] | None = None, sampling: Mapping[str, Any] | None = None) -> CalibrationResult:
    """Measure `model`'s attention on `calibration_inputs` and return the fastest plan under `budget`.

    calibration_inputs: a sequence of positional-input tuples (or RecordedCalls from
      vsopt.calibration.record_forward_inputs, which also carry kwargs and the denoising step).
    budget: SiteErrorBudget, DensityBudget, SpeedupBudget or QualityFloor (see their docs).
    out: where to write the plan (JSON, plus safetensors masks beside it); the checkpoint
      `<out>.calibration.safetensors` lets an interrupted run resume (resume=False starts over);
      it is removed once the plan is written.
    grid / grids: token grids for sites whose grid cannot be inferred (as in the backend options).
    sampling: how the calibration inputs were sampled (e.g. {"steps": 8, "guidance": 1.0}), kept in
      the plan's meta["calibration"]["sampling"]: a plan's step ranges are step indices, so a run
      that samples otherwise can say so (vsopt demo does).
    """
    return calibrate_many(model, calibration_inputs, [budget], options=options, out=out, resume=resume,
                          progress=progress, grid=grid, grids=grids, sampling=sampling)[0]


def calibrate_many(model: torch.nn.Module, calibration_inputs: Sequence[Any], budgets: Sequence[Budget], *,
                   options: CalibrationOptions | None = None, out: str | os.PathLike | None = None,
                   resume: bool = True, progress: bool = True, grid: TokenGrid | None = None,
                   grids: dict[str, TokenGrid] | None = None,
                   sampling: Mapping[str, Any] | None = None) -> list[CalibrationResult]:
    """calibrate() for several budgets on one set of measurements (the two passes run once, then
    one search, plan and check per budget). With `out`, only one budget (the plan is written)."""
    options = options or CalibrationOptions()
    budgets = list(budgets)
    if not budgets:
        raise ConfigError("calibrate_many needs at least one budget")
    if out is not None and len(budgets) != 1:
        raise ConfigError("calibrate_many: `out` takes one budget; write each result's plan yourself")
    for budget in budgets:
        if not isinstance(budget, BUDGET_TYPES):
            raise ConfigError(f"budget must be a SiteErrorBudget, DensityBudget, SpeedupBudget or QualityFloor, "
                              f"got {budget!r}")
    calls = [as_recorded(x, i) for i, x in enumerate(calibration_inputs)]
    if not calls:
        raise ConfigError("calibrate needs at least one calibration input")
    cost = options.cost_model or CostModel.default(torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    signature, inputs = positional(model, calls)
    config = VsoptConfig(grid=grid, grids=dict(grids or {}))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with signature.bound(model):
                gm, report = _trace(model, inputs[0], config)
        uncalibrated = [(s, why) for s in report.sites if (why := calibratable(s))]
        left_dense = {s.site_id: why for s, why in uncalibrated}
        sites = [s for s in report.sites if s.site_id not in left_dense]
        if not sites:
            raise ConfigError(f"no attention site to calibrate: found {len(report.sites)} site(s), left dense: "
                              f"{left_dense or 'none'}")
        ranges = options.step_ranges
        range_ids = [range_of(c.step, ranges) for c in calls]
        used = sorted({r for r in range_ids if r is not None})
        if not used:
            raise ConfigError(f"no calibration input falls in the step ranges {ranges}")
        # a range's budget share grows with the steps it runs (search_density / search_time)
        states = {(s.site_id, r): SiteState(s, options, site_orders(s.grid, options.orders), steps=range_ids.count(r))
                  for s in sites for r in used}
        mass_inputs = _mass_inputs(range_ids, options.held_out_errors, ranges)
        # pass 2 runs on the first `error_inputs` inputs of each step range (not pass 1's, held out)
        take, seen = [], {}
        for i, r in enumerate(range_ids):
            if (r is not None and seen.get(r, 0) < (options.error_inputs or len(calls))
                    and not (options.held_out_errors and i in mass_inputs)):
                take.append(i)
                seen[r] = seen.get(r, 0) + 1
        if options.mask_refresh:  # reused masks where pass 2 can measure them (calibration.reuse)
            for (sid, r), st in states.items():
                st.range_start = 0 if ranges is None else ranges[r][0]
                st.refresh = measurable_intervals(options.mask_refresh, st.range_start,
                                                  [calls[i].step for i in take if range_ids[i] == r])
        if options.renorm_every or options.residual_every:  # corrected candidates where pass 2 can measure
            for (sid, r), st in states.items():             # them (calibration.renorm)
                st.range_start = 0 if ranges is None else ranges[r][0]
                steps_r = [calls[i].step for i in take if range_ids[i] == r]
                st.renorm = measurable_intervals(options.renorm_every, st.range_start, steps_r)
                st.residual = measurable_intervals(options.residual_every, st.range_start, steps_r)
        ckpt = Checkpoint(out, fingerprint(sites, calls, options)) if out is not None else None
        measured, errors_done = ckpt.load(states) if (ckpt and resume) else (0, 0)

        def observe(fn, r):
            return lambda call: None if (call.site_id, r) not in states else fn(states[(call.site_id, r)], call)

        with torch.no_grad():
            bar = tqdm(range(len(calls)), desc="calibrate: measure block mass", disable=not progress, initial=measured)
            for i in range(measured, len(calls)):
                if i in mass_inputs:
                    run_observing(gm, inputs[i], observe(measure_mass, range_ids[i]))
                if ckpt:
                    ckpt.save(states, i + 1, 0, force=i + 1 == len(calls))
                bar.update(1)
            bar.close()
            if errors_done and (options.clusters or any(st.refresh or st.renorm or st.residual for st in states.values())):
                # reusing candidates keep masks across pass 2's inputs, which the checkpoint does
                # not hold: pass 2 starts over (build_candidates zeroes its sums)
                errors_done = 0
            if not errors_done:
                for st in states.values():
                    build_candidates(st)
            bar = tqdm(range(len(take)), desc="calibrate: candidate errors", disable=not progress, initial=errors_done)
            for j in range(errors_done, len(take)):
                step = calls[take[j]].step
                run_observing(gm, inputs[take[j]],
                              observe(lambda st, call: measure_errors(st, call, step), range_ids[take[j]]))
                if ckpt:
                    ckpt.save(states, len(calls), j + 1, force=j + 1 == len(take))
                bar.update(1)
            bar.close()

            first_of_range = {r: inputs[range_ids.index(r)] for r in used}
            found = []
            searched = any(not isinstance(b, QualityFloor) for b in budgets)   # the budgets that use weights
            weights = state_weights(states, calls, range_ids, options.error_weights) if searched else None
            for budget in budgets:
                if isinstance(budget, QualityFloor):
                    held = positional(model, [*calls, as_recorded(budget.held_out, len(calls))])[1][-1]
                    plan, results, quality = _quality_search(model, signature, held, states, used, options, cost,
                                                             budget, config, progress, uncalibrated)
                else:
                    decisions, warmup = decide_with_warmup(states, cost, budget, weights, options.step_ranges,
                                                           options.dense_warmup)
                    plan, results = assemble(states, decisions, options, cost, budget, uncalibrated)
                    if options.dense_warmup:
                        plan.meta["calibration"]["dense_warmup"] = warmup
                    quality = None
                if sampling:
                    plan.meta["calibration"]["sampling"] = dict(sampling)
                _verify(gm, states, plan, results, first_of_range, options.step_ranges)
                found.append(CalibrationResult(plan, results, left_dense, budget_text(budget), quality))
        if out is not None:
            found[0].plan.save(out)
            if ckpt:
                ckpt.remove()
        return found
    finally:
        model.train(was_training)


def _mass_inputs(range_ids: Sequence[int | None], held_out: bool, ranges) -> set[int]:
    """The inputs pass 1 (block mass) runs on: every input in a step range, or with held_out
    (CalibrationOptions.held_out_errors) the first half of each range's, the rest left to pass 2."""
    by_range: dict[int, list[int]] = {}
    for i, r in enumerate(range_ids):
        if r is not None:
            by_range.setdefault(r, []).append(i)
    if not held_out:
        return {i for ids in by_range.values() for i in ids}
    short = held_out_shortfall(range_ids, ranges)
    if short:
        raise ConfigError(f"held_out_errors {short}")
    return {i for ids in by_range.values() for i in ids[:len(ids) // 2]}


def held_out_shortfall(range_ids: Sequence[int | None], ranges) -> str | None:
    """Why held_out_errors cannot split these inputs (their step ranges' indices, range_of), as
    the end of a sentence (callers name the option: `vsopt calibrate` checks a FACTORY's inputs
    with it before anything is measured); None when every used range has 2 or more inputs."""
    counts: dict[int, int] = {}
    for r in range_ids:
        if r is not None:
            counts[r] = counts.get(r, 0) + 1
    few = {r: n for r, n in counts.items() if n < 2}
    if not few:
        return None
    r = min(few)
    where = "the calibration" if ranges is None else f"step range {ranges[r][0]}:{ranges[r][1] or ''}"
    return (f"needs at least 2 calibration inputs per step range; {where} has {few[r]} (give more clips or "
            f"sampler runs)")


def calibrated_sites(model: torch.nn.Module, calibration_inputs: Sequence[Any], grid: TokenGrid | None = None,
                     grids: dict[str, TokenGrid] | None = None) -> list:
    """The sites calibrate() calibrates on these inputs (traced as it traces them: the same site
    ids and grids), for choices made before it runs (`vsopt calibrate --clusters` sizes its
    cluster heads from them). One trace of the model on the first input."""
    calls = [as_recorded(x, i) for i, x in enumerate(calibration_inputs)]
    if not calls:
        raise ConfigError("calibrate needs at least one calibration input")
    signature, inputs = positional(model, calls)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), signature.bound(model):
            _, report = _trace(model, inputs[0], VsoptConfig(grid=grid, grids=dict(grids or {})))
    finally:
        model.train(was_training)
    return [s for s in report.sites if calibratable(s) is None]


def _trace(model: torch.nn.Module, example: tuple, config: VsoptConfig):
    """trace_and_rewrite(model, example); when it fails, a ConfigError naming the step that failed:
    running the model on the example inputs (the model rejects them), or tracing it."""
    try:
        return trace_and_rewrite(model, example, config)
    except VsoptError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's model or inputs: name the step, then the cause
        try:
            model(*example)
        except Exception as eager:  # noqa: BLE001
            raise step_failed("running the model on the first calibration input", eager) from eager
        raise step_failed("tracing the model with the first calibration input (torch.export)", e) from e


def state_weights(states: dict, calls: Sequence[RecordedCall], range_ids: Sequence[int | None],
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
            sp = plan[call.site_id]
            heads = sp.heads if ranges is None else sp.heads_at(ranges[rng][0])
            ref = exact_attention(call)
            out = site_output(states[key].site, heads, call.q, call.k, call.v, call.scale, softcap=call.softcap)
            err2[key] = err2.get(key, 0.0) + float((out.double() - ref.double()).pow(2).sum())
            norm2[key] = norm2.get(key, 0.0) + float(ref.double().pow(2).sum())
            return None

        run_observing(gm, inputs, observer)
        for key in err2:
            by_key[key].actual_rel_l2 = math.sqrt(err2[key] / max(norm2[key], 1e-300))


def _quality_search(model, signature: Signature, held: tuple, states, used, options, cost, budget: QualityFloor,
                    config, progress, uncalibrated) -> tuple[Plan, list[SiteResult], float]:
    """Bisect a per-site error budget (log scale) for the loosest one whose plan keeps the held-out
    output within the floor; the held-out input runs with each site's output replaced by the plan's."""
    with signature.bound(model):
        held_gm, _ = trace_and_rewrite(model, held, config)
        dense_out = model_output(model(*held)).float()

    def score(plan: Plan) -> float:
        def substitute(call: SiteCall):
            if (call.site_id, used[0]) not in states:  # not calibrated: its dense entry changes nothing
                return None
            site = states[(call.site_id, used[0])].site
            return site_output(site, plan[call.site_id].heads, call.q, call.k, call.v, call.scale,
                               softcap=call.softcap)

        out = model_output(run_observing(held_gm, held, substitute)).float()
        return psnr(out, dense_out) if budget.metric is QualityMetric.PSNR else relative_l2(out, dense_out)

    def build(eps: float):
        return assemble(states, decide(states, cost, SiteErrorBudget(eps)), options, cost, budget, uncalibrated)

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
