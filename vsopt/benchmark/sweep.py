"""bench(): sweep the methods and densities of a BenchSettings on one model, one BenchPoint per
configuration, speed measured on a GPU or predicted by the cost model elsewhere."""
from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

import torch

from vsopt.benchmark.aggregate import predicted_attention_speedup
from vsopt.benchmark.methods import method_plan
from vsopt.benchmark.scorer import PlanScorer
from vsopt.benchmark.settings import BenchPoint, BenchSettings, Method
from vsopt.core.plan import Plan, Quant


def bench(ref, settings: BenchSettings | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Sweep `settings` on a vsopt.models.ReferenceModel (or any object with .transformer, .encode
    and .config with frames/height/width); returns the JSON-ready result (see the package doc)."""
    from vsopt.core.costmodel import CostModel

    settings = settings or BenchSettings()
    scorer = PlanScorer(ref, settings, progress=progress)
    on_gpu = scorer.device.type == "cuda"
    cost = CostModel.default(torch.cuda.get_device_name() if on_gpu else None)
    dense_ms = forward_ms(scorer.velocity, scorer.example, None, settings) if on_gpu else None

    def predicted(plan: Plan) -> float:  # dynamic heads at their density on the scored clip's q/k
        return predicted_attention_speedup(plan, scorer.sites, cost, settings.steps, scorer.dense_calls_by_step)

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
            ms = forward_ms(scorer.velocity, scorer.example, plan, settings)
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

    for method, density in iterator:
        plan, notes = method_plan(method, scorer.sites, density, settings, scorer.calibrated_plan, scorer.dense_calls)
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
    return {
        "benchmark": "vsopt-bench", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
        "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=lambda v: v.value)),
        "model": {"latent_clip": list(scorer.shape[1:]), "sites": [s.site_id for s in scorer.sites]},
        "dense_ms": dense_ms, "dense_sample_s": scorer.dense_sample_s,
        "points": [dataclasses.asdict(p) for p in points],
    }


def forward_ms(velocity, example, plan, settings: BenchSettings) -> float:
    """Median ms of one compiled forward of the scorer's Velocity wrapper (GPU), backend vsopt with `plan`."""
    import torch._dynamo

    from vsopt.core.timing import median_ms

    torch._dynamo.reset()
    compiled = torch.compile(velocity, backend="vsopt", options={"plan": plan} if plan is not None else {},
                             dynamic=False)
    with torch.no_grad():
        return median_ms(lambda: compiled(*example), settings.timing_iters, warmup=3, cuda=True)
