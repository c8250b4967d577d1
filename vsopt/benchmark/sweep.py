"""bench(): sweep the methods and densities of a BenchSettings on one model, one BenchPoint per
configuration, speed measured on a GPU or predicted by the cost model elsewhere.

On a GPU the speed is measured over the whole sampler run (every denoising step: step ranges,
warm-ups, mask reuse and measuring/correcting steps run as they do for a user), against the same
run of the dense model (sampling_ms: the rewritten graphs eagerly, or torch.compile with
settings.timing "compiled", the same under CUDA graphs with "cudagraphs"); on the CPU it is
predicted by the cost model and settings.timing is not used. With settings.time_limit_s the sweep stops starting configurations
once that many seconds have passed, and records the ones it did not run (result["not_run"], with
the reason); a configuration whose plan cannot be made at its density (e.g. rettention's
measuring steps alone exceeding it) is recorded there too, and the sweep goes on."""
from __future__ import annotations

import dataclasses
import datetime
import json
import time
from typing import Any, Callable

import torch

from vsopt.benchmark.aggregate import plan_options, predicted_attention_speedup
from vsopt.benchmark.methods import method_plan
from vsopt.benchmark.scorer import PlanScorer
from vsopt.benchmark.settings import BenchPoint, BenchSettings, Method
from vsopt.core.errors import ConfigError
from vsopt.core.plan import Plan, Quant


def bench(ref, settings: BenchSettings | None = None, *, progress: bool = True,
          partial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Sweep `settings` on a vsopt.models.ReferenceModel (or any object with .transformer, .encode
    and .config with frames/height/width); returns the JSON-ready result (see the package doc).
    partial(result): called with the result so far after every point (e.g. to write it, so that a
    run cut short keeps what it measured)."""
    from vsopt.core.costmodel import CostModel

    started = time.perf_counter()
    settings = settings or BenchSettings()
    scorer = PlanScorer(ref, settings, progress=progress)
    on_gpu = scorer.device.type == "cuda"
    cost = CostModel.default(torch.cuda.get_device_name() if on_gpu else None)
    dense_ms = sampling_ms(scorer, None, settings) if on_gpu else None
    not_run: list[dict[str, Any]] = []
    points: list[BenchPoint] = []

    def result() -> dict[str, Any]:
        return _result(settings, scorer, on_gpu, dense_ms, points, not_run, started)

    def predicted(plan: Plan) -> float:  # dynamic heads at their density on the scored clip's q/k
        return predicted_attention_speedup(plan, scorer.sites, cost, settings.steps, scorer.dense_calls_by_step)

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
            ms = sampling_ms(scorer, plan, settings)
            notes = [*notes, *timing_notes(plan, settings)]
            speedup, source = dense_ms / ms, "measured-gpu"
        else:
            speedup = predicted(plan)
            ms, source = None, "predicted-cost-model"
        points.append(BenchPoint(
            method=method.value, target_density=density, density=scores["density"],
            quant=(Quant.INT8 if method is Method.SAGE else settings.quant).value,
            psnr=scores["psnr"], ssim=scores["ssim"], rel_l2=scores["rel_l2"],
            site_cosine_min=scores["site_cosine_min"], site_rel_l2_max=scores["site_rel_l2_max"],
            sites=scores["sites"], speedup=speedup, speedup_source=source, ms=ms, notes=notes,
            target_speedup=target_speedup))
        if partial is not None:
            partial(result())

    def out_of_time() -> bool:
        return settings.time_limit_s is not None and time.perf_counter() - started > settings.time_limit_s

    for method, density in iterator:
        # vsopt's plans of every density come from one calibration: once made, scoring them is cheap
        if out_of_time() and not (method is Method.VSOPT and scorer.has_calibrated(density)):
            not_run.append({"method": method.value, "target_density": density,
                            "why": f"time limit {settings.time_limit_s:g} s reached"})
            continue
        try:  # vsopt: every density of the run from one calibration
            plan, notes = method_plan(method, scorer.sites, density, settings,
                                      lambda d: scorer.calibrated_plans(settings.densities)[d], scorer.dense_calls)
        except ConfigError as e:  # this density is out of the method's reach: say so, go on
            not_run.append({"method": method.value, "target_density": density, "why": str(e)})
            continue
        if method is Method.VSOPT:  # which options the calibration chose
            notes = [*notes, plan_options(plan, scorer.sites, settings.steps)]
        add(method, density, plan, notes)
    if by_time:
        # the baselines' PREDICTED speedups (on a GPU too: the time budget is the cost model's)
        targets = list(settings.vsopt_speedups)
        if settings.vsopt_match:
            targets += [predicted(method_plan(Method(p.method), scorer.sites, p.target_density, settings)[0])
                        for p in points if p.method in (Method.TOPK.value, Method.WINDOW.value, Method.RADIAL.value)]
        targets = sorted(set(round(t, 4) for t in targets))
        for target, (plan, site_target) in zip(targets, scorer.calibrated_plans_at_speedups(targets, cost)):
            add(Method.VSOPT, None, plan, [f"calibrated at predicted speedup {target:g}x (calibrated sites "
                                           f"{site_target:.3g}x)"], target_speedup=target)
    return result()


def _result(settings, scorer, on_gpu, dense_ms, points, not_run, started) -> dict[str, Any]:
    return {
        "benchmark": "vsopt-bench", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
        "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=lambda v: v.value)),
        "model": {"latent_clip": list(scorer.shape[1:]), "sites": [s.site_id for s in scorer.sites]},
        "dense_ms": dense_ms, "dense_sample_s": scorer.dense_sample_s,
        "points": [dataclasses.asdict(p) for p in points], "not_run": list(not_run),
        "wall_s": time.perf_counter() - started,
    }


# untimed sampler runs before the timed ones under CUDA graphs: as `vsopt demo --cudagraphs` calls
# each graph, the first call compiles (and autotunes) and runs in the cudagraph trees' warm-up, the
# second records; a per-step plan's graph is called once per run, so the first timed run replays
CUDAGRAPHS_WARMUP_RUNS = 2


def timing_notes(plan: Plan | None, settings: BenchSettings) -> list[str]:
    """What the timed run of `plan` does that its scored run does not: under CUDA graphs, masks
    that the plan reuses across steps are recomputed at every step (vsopt.cudagraphs.plan_for_cudagraphs),
    so the measured speed is that of more work than the quality was scored with."""
    from vsopt.cudagraphs import plan_for_cudagraphs

    if settings.timing != "cudagraphs" or plan is None or plan_for_cudagraphs(plan) is plan:
        return []
    return ["timed with every reused mask (and cluster layout) recomputed at every step: CUDA graphs run no "
            "reuse across steps, so this speed is of more work than the scored plan does"]


def sampling_ms(scorer: PlanScorer, plan: Plan | None, settings: BenchSettings) -> float:
    """Median ms of one whole sampler run (settings.steps steps on the scored clip's inputs) with
    `plan` (None: dense; the bench calls it on a GPU), after one untimed run that builds every
    step variant (and JITs the kernels). settings.timing "eager": the rewritten graphs run as the
    scorer runs them (the lowered FX graph per step segment, no Inductor; dense: the traced
    model's own graph), which costs no compilation per configuration; "compiled":
    torch.compile(backend="vsopt") with the plan, as a user runs it (Inductor compiles every step
    variant: tens of seconds per plan); "cudagraphs": the same with options cudagraphs=True, dense
    too (vsopt's exact dense ops under Inductor's CUDA graphs; vsopt/cudagraphs.py), after
    CUDAGRAPHS_WARMUP_RUNS untimed runs."""
    from vsopt.benchmark.scorer import _as_sampler_model
    from vsopt.core.timing import median_ms
    from vsopt.models import sampler

    warmup = 1
    if settings.timing in ("compiled", "cudagraphs"):
        from torch import _dynamo

        _dynamo.reset()
        options: dict = {"plan": plan} if plan is not None else {}
        if settings.timing == "cudagraphs":
            options["cudagraphs"] = True
            warmup = CUDAGRAPHS_WARMUP_RUNS
        model = _as_sampler_model(torch.compile(scorer.velocity, backend="vsopt", dynamic=False, options=options))
    else:
        model = scorer.step_model(plan)
    with torch.no_grad():
        return median_ms(lambda: sampler.sample(model, scorer.cond, scorer.shape, steps=settings.steps,
                                                seed=settings.seed),
                         settings.timing_iters, warmup=warmup, cuda=scorer.device.type == "cuda")
