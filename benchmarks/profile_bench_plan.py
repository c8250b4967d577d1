"""Where the bench's compiled 8-step sampler run spends its time, dense against a top-k plan (GPU).

    source benchmarks/gpu_env.sh && python3 benchmarks/profile_bench_plan.py [--clip 16,64,64] [--density 0.2]

The bench's own setting (vsopt bench --methods topk --timing compiled): the shipped reference
model in bf16, the sampler driving torch.compile(backend="vsopt") of the same velocity wrapper,
dense (no plan), the top-k plan, and the plan with options={"cudagraphs": True}. Each is compiled
and timed (median of 5 runs after 2 untimed ones) before anything is profiled: once the profiler
has run, CUPTI stays attached and later launches cost more host time, so timings taken after a
profile are not comparable (session 12's first, uncommitted version of this script timed after
profiling and read 90-102 ms for a plan the bench measured at 41-81 ms; its profile tables, the
ones this script prints, are benchmarks/results/profile_topk_s12_*_h200.log). Then one run of each is profiled:
the top CUDA kernels and the top host ops, and Dynamo's graph counts.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import _dynamo
from torch.profiler import ProfilerActivity, profile

from vsopt.benchmark.methods import method_plan
from vsopt.benchmark.scorer import PlanScorer, _as_sampler_model
from vsopt.benchmark.settings import BenchSettings, Method
from vsopt.models import sampler
from vsopt.models.model import load_shipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", default="16,64,64", help="latent clip F,H,W")
    p.add_argument("--density", type=float, default=0.2, help="top-k fraction of key blocks")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_bench_plan.py: needs a CUDA GPU")
    clip = tuple(int(v) for v in args.clip.split(","))
    ref = load_shipped(device="cuda", dtype=torch.bfloat16).eval()
    s = BenchSettings(methods=(Method.TOPK,), densities=(args.density,), steps=args.steps, clip=clip,
                      timing="compiled")
    scorer = PlanScorer(ref, s)
    plan, _ = method_plan(Method.TOPK, scorer.sites, args.density, s, None, scorer.dense_calls)
    configs = {"dense": {}, f"topk{args.density:g}": {"plan": plan},
               f"topk{args.density:g}+cudagraphs": {"plan": plan, "cudagraphs": True}}
    runs = {}
    for name, options in configs.items():
        _dynamo.reset()
        model = _as_sampler_model(torch.compile(scorer.velocity, backend="vsopt", dynamic=False, options=options))
        runs[name] = lambda m=model: sampler.sample(m, scorer.cond, scorer.shape, steps=s.steps, seed=s.seed)
        with torch.no_grad():
            t0 = time.perf_counter()
            runs[name]()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            runs[name]()
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                runs[name]()
                torch.cuda.synchronize()
                times.append(1e3 * (time.perf_counter() - t0))
        print(f"{name}: first run {first:.1f} s, {statistics.median(times):.2f} ms per {s.steps}-step run "
              f"(median of 5)", flush=True)
    # the compiled models stay alive in `runs`; profiling last keeps the timings above clean
    for name, run in runs.items():
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        table = prof.key_averages()
        print(f"\n== {name}: by CUDA time")
        print(table.table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))
        print(f"== {name}: by host time")
        print(table.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
