"""vsopt's accuracy options one at a time: the calibrated plans with no option, with each option
alone, and with the bench's defaults, scored on the same clip (CPU or GPU; issue 17).

    python3 benchmarks/vsopt_ablation.py --densities 0.2,0.3 --steps 8 --clip 4,32,32 --device cpu \
        --variants none,pooled,warmup,renorm,default --out bench_ablation

One PlanScorer for every variant (PlanScorer.with_settings): the dense clip, its recorded calls,
the calibration clip and the sensitivity weights are made once; each variant runs its own
calibration (calibrate_many: one measurement, one search per density) and scores its plans.
Variants (the bench flags each stands for; "none" is vsopt's plain candidates: block masks,
patterns, dynamic masks, skip, PARO orders, one plan per calibration step):

    (every variant but renorm and the defaults also has --vsopt-renorm "")
    none      --no-vsopt-pooled --vsopt-warmup ""
    pooled    --vsopt-warmup ""                      (the pooled remainder, PSA, alone)
    warmup    --no-vsopt-pooled                       (dense warm-up k = 0 or 1 alone)
    renorm    --no-vsopt-pooled --vsopt-warmup "" --vsopt-renorm 3   (the correction alone)
    reuse     --no-vsopt-pooled --vsopt-warmup "" --no-step-plans --vsopt-refresh 2
              (mask reuse alone; it needs one plan for all steps, so compare it with none_one_plan)
    none_one_plan  --no-vsopt-pooled --vsopt-warmup "" --no-step-plans
    clusters  --no-vsopt-pooled --vsopt-warmup "" --vsopt-clusters
    default   (the bench's defaults: pooled remainder + warm-up k = 0 or 1 + correction every 3)
    default_renorm  --vsopt-renorm 3 (the defaults since session 8)
    default_no_renorm  --vsopt-renorm ""   (the defaults before session 8)

Writes OUT/ablation.json (the settings, and per variant and density the scores, the density run,
the plan's options note and the variant's wall time; rewritten after each variant) and prints a
markdown table. Speed is not measured (see `vsopt bench` for that).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

VARIANTS = {
    "none": dict(vsopt_pooled=False, vsopt_warmup=(), vsopt_renorm=()),
    "pooled": dict(vsopt_pooled=True, vsopt_warmup=(), vsopt_renorm=()),
    "warmup": dict(vsopt_pooled=False, vsopt_warmup=(1,), vsopt_renorm=()),
    "renorm": dict(vsopt_pooled=False, vsopt_warmup=(), vsopt_renorm=(3,)),
    "reuse": dict(vsopt_pooled=False, vsopt_warmup=(), step_plans=False, vsopt_renorm=(), vsopt_refresh=(2,)),
    "none_one_plan": dict(vsopt_pooled=False, vsopt_warmup=(), step_plans=False, vsopt_renorm=()),
    "clusters": dict(vsopt_pooled=False, vsopt_warmup=(), vsopt_renorm=(), vsopt_clusters=True),
    "default": dict(),
    "default_renorm": dict(vsopt_renorm=(3,)),  # the defaults since session 8
    "default_no_renorm": dict(vsopt_renorm=()),
}


def add_clip_arguments(p: argparse.ArgumentParser) -> None:
    """The bench settings every CPU study of vsopt's calibration takes (this script's and
    vsopt_search_variants.py's): the densities, the sampler run and the device."""
    p.add_argument("--densities", default="0.2,0.3")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--clip", default="4,32,32")
    p.add_argument("--calibration-steps", type=int, default=None, help="default: --steps (BenchSettings)")
    p.add_argument("--calibration-clips", type=int, default=1,
                   help="clips (descriptions and noises) of the calibration's sampler run, one batch")
    p.add_argument("--device", default="cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_clip_arguments(p)
    p.add_argument("--variants", default="none,pooled,warmup,renorm,default")
    p.add_argument("--out", default="bench_ablation")
    args = p.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"error: unknown --variants {unknown or args.variants!r}; known: {sorted(VARIANTS)}", file=sys.stderr)
        return 2
    try:
        densities = tuple(float(d) for d in args.densities.split(","))
        clip = tuple(int(x) for x in args.clip.split(","))
    except ValueError as e:
        print(f"error: bad --densities or --clip: {e}", file=sys.stderr)
        return 2

    import torch

    from vsopt.benchmark import BenchSettings, Method, PlanScorer
    from vsopt.benchmark.aggregate import plan_options
    from vsopt.core.io import atomic_write_json
    from vsopt.models.model import load_shipped

    base = BenchSettings(methods=(Method.VSOPT,), densities=densities, steps=args.steps, clip=clip,
                         calibration_steps=args.calibration_steps, calibration_clips=args.calibration_clips)
    ref = load_shipped(device=args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32).eval()
    t0 = time.perf_counter()
    scorer = PlanScorer(ref, base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "vsopt-ablation", "settings": json.loads(json.dumps(dataclasses.asdict(base),
                                                                                 default=lambda v: v.value)),
              "device": args.device, "scorer_s": time.perf_counter() - t0, "variants": {}}
    for name in variants:
        t = time.perf_counter()
        settings = dataclasses.replace(base, **VARIANTS[name])
        sc = scorer.with_settings(settings)
        plans = sc.calibrated_plans(densities)
        rows = []
        for d in densities:
            s = sc.score(plans[d])
            rows.append({"target_density": d, "density": s["density"], "psnr": s["psnr"], "ssim": s["ssim"],
                         "rel_l2": s["rel_l2"], "site_cosine_min": s["site_cosine_min"],
                         "options": plan_options(plans[d], sc.sites, settings.steps)})
        result["variants"][name] = {"flags": VARIANTS[name], "points": rows, "wall_s": time.perf_counter() - t}
        atomic_write_json(out / "ablation.json", json.loads(json.dumps(result, default=list)))
        print(f"{name}: " + " | ".join(f"{r['density']:.3f} {r['psnr']:.2f} dB" for r in rows)
              + f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    print("\n| variant | " + " | ".join(f"density / PSNR / SSIM at {d:g}" for d in densities) + " |")
    print("|---|" + "---|" * len(densities))
    for name, v in result["variants"].items():
        print(f"| {name} | " + " | ".join(f"{r['density']:.3f} / {r['psnr']:.2f} / {r['ssim']:.3f}"
                                          for r in v["points"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
