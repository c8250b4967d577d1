"""`vsopt bench`: add_arguments(parser) and run_cli(args). Only argparse at module level (the
command's defaults come from BenchSettings, imported when the parser is built for this command)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vsopt.benchmark.settings import BenchSettings, Method
    from vsopt.core.plan import Quant

    d = BenchSettings()
    p.add_argument("--methods", default=",".join(m.value for m in d.methods),
                   help=f"comma-separated, from {[m.value for m in Method if m is not Method.DENSE]}")
    p.add_argument("--densities", default=",".join(f"{x:g}" for x in d.densities),
                   help="comma-separated block densities in (0, 1]")
    p.add_argument("--quant", default=d.quant.value, choices=[q.value for q in Quant], help="precision of sparse methods")
    p.add_argument("--steps", type=int, default=d.steps, help="sampler steps per clip")
    p.add_argument("--clips", type=int, default=d.clips, help="clips sampled per configuration")
    p.add_argument("--block", type=int, default=d.block, help="kernel block size")
    p.add_argument("--clip", default=None, help="latent clip F,H,W; none: the size the model was trained on")
    p.add_argument("--device", default=None, help="cuda or cpu; none: cuda when available")
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
    from pathlib import Path

    import torch

    from vsopt.benchmark.report import plot_pareto, summary_table, write_json
    from vsopt.benchmark.settings import BenchSettings, Method
    from vsopt.benchmark.sweep import bench
    from vsopt.core.errors import ConfigError
    from vsopt.core.plan import Quant
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
    write_json(result, out / "bench.json")
    plot_pareto(result, out / "pareto.png")
    print(summary_table(result))
    print(f"wrote {out / 'bench.json'} and {out / 'pareto.png'}")
    return 0
