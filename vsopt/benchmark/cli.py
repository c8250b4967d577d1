"""`vsopt bench`: add_arguments(parser) and run_cli(args). Only argparse at module level (the
command's defaults come from BenchSettings, imported when the parser is built for this command; it
does not import torch, so `vsopt bench --help` answers at once)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from vsopt.benchmark.settings import TIMINGS, BenchSettings, Method, Quant

    # the fields' defaults, unchecked: BenchSettings() would run its checks, which import vsopt.core (torch)
    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(BenchSettings)})
    p.add_argument("--methods", default=",".join(m.value for m in d.methods),
                   help=f"comma-separated, from {[m.value for m in Method if m is not Method.DENSE]}")
    p.add_argument("--densities", default=",".join(f"{x:g}" for x in d.densities),
                   help="comma-separated block densities in (0, 1]")
    p.add_argument("--quant", default=d.quant.value, choices=[q.value for q in Quant], help="precision of sparse methods")
    p.add_argument("--steps", type=int, default=d.steps, help="sampler steps per clip")
    p.add_argument("--clips", type=int, default=d.clips, help="clips sampled per configuration")
    p.add_argument("--calibration-steps", type=int, default=None,
                   help="vsopt: sampler steps of the calibration clip (one calibration input and step plan per "
                        "step; default: --steps)")
    p.add_argument("--block", type=int, default=d.block, help="kernel block size: a power of two, 16 to 256")
    p.add_argument("--clip", default=None, help="latent clip F,H,W; none: the size the model was trained on")
    p.add_argument("--device", default=None, help="cuda or cpu; none: cuda when available")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: no configuration is started after this (those left are listed as not run)")
    # checked by BenchSettings (a one-line error naming --timing), not by argparse's choices
    p.add_argument("--timing", default=d.timing,
                   help=f"GPU speed ({', '.join(TIMINGS)}): the rewritten graphs run eagerly (no compile per "
                        "plan); torch.compile (backend vsopt, Inductor: tens of seconds per plan); or the same "
                        "under CUDA graphs (options cudagraphs, dense too). Not used on the CPU (speed predicted)")
    p.add_argument("--out", default="bench", help="output folder for bench.json and pareto.png")
    p.add_argument("--no-step-plans", action="store_true", help="vsopt: one plan for all steps (no step ranges)")
    p.add_argument("--vsopt-speedups", default=None,
                   help="vsopt: calibrate under a time budget (the cost model's predicted attention speedup over "
                        "dense, fixed costs of dynamic masks and permutations included) at these speedups instead "
                        "of at --densities; comma-separated numbers, 'match' = at each baseline point's predicted "
                        "speedup (e.g. 1.1,1.3,match)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="method warmup: the first steps run dense (the rest sparser, same mean density)")
    p.add_argument("--mask-refresh", type=int, default=d.mask_refresh,
                   help="method reuse: top-k masks computed every this many steps and reused in between")
    p.add_argument("--vsopt-warmup", default=",".join(map(str, d.vsopt_warmup)),
                   help="vsopt: dense warm-ups (first steps dense) the calibration may choose, comma-separated; "
                        "empty: none")
    p.add_argument("--vsopt-refresh", default=",".join(map(str, d.vsopt_refresh)),
                   help="vsopt: refresh intervals (>= 2) of reused dynamic masks the calibration may choose")
    p.add_argument("--renorm-every", type=int, default=d.renorm_every,
                   help="methods rettention, rettention_pooled, residual: measuring (exact or pooled) every this many steps")
    p.add_argument("--vsopt-renorm", default=",".join(map(str, d.vsopt_renorm)),
                   help="vsopt: measuring intervals (>= 2) of the softmax-mass correction (Re-ttention) the "
                        "calibration may choose, comma-separated; empty: none")
    p.add_argument("--vsopt-residual", default=",".join(map(str, d.vsopt_residual)),
                   help="vsopt: refresh intervals (>= 2) of residual sharing (DiTFastAttn: exact every this many "
                        "steps, its error added to the sparse steps between) the calibration may choose; empty: none")
    p.add_argument("--vsopt-top-k", default=",".join(f"{x:g}" for x in d.vsopt_top_k),
                   help="vsopt: top-k fractions of the calibration's dynamic candidates, comma-separated")
    p.add_argument("--no-vsopt-pooled", action="store_true",
                   help="vsopt: no pooled-remainder (PSA) candidates in the calibration")
    p.add_argument("--cluster-clusters", default=",".join(map(str, d.cluster_clusters)),
                   help="method cluster: query,key k-means clusters per head (0: one per kernel block)")
    p.add_argument("--cluster-refresh", type=int, default=d.cluster_refresh,
                   help="method cluster: the k-means clustering is refreshed every this many steps (warm-started)")
    p.add_argument("--vsopt-clusters", action="store_true",
                   help="vsopt: also offer cluster heads (Sparse VideoGen 2) to the calibration")
    p.add_argument("--vsopt-held-out", action="store_true",
                   help="vsopt: measure the calibration's candidate errors on a second calibration clip, not on "
                        "the one its masks are made from")
    p.add_argument("--vsopt-probe", action="store_true",
                   help="vsopt: measure the sensitivity weights with a pooled top-k probe at the lowest density "
                        "(the error kind the plans make) instead of top-k 0.5")
    p.add_argument("--no-sensitivity", action="store_true",
                   help="vsopt: weigh every site's and step's error alike (no measured output sensitivity)")


def _check_args(args: argparse.Namespace):
    """The BenchSettings and the device from the options, every value checked before the model is
    loaded; each error a ConfigError naming its option."""
    from pathlib import Path

    import torch

    from vsopt.benchmark.settings import BenchSettings, Method
    from vsopt.calibration.options import check_block_size, check_cost_model_blocks, check_device
    from vsopt.core.costmodel import CostModel
    from vsopt.core.errors import ConfigError
    from vsopt.core.plan import Quant

    def items(option: str, text: str | None, parse):
        try:
            return tuple(parse(v.strip()) for v in (text or "").split(",") if v.strip())
        except ValueError as e:
            raise ConfigError(f"bad {option} {text!r}: {e}") from None

    methods = items("--methods", args.methods, Method)
    if not methods:
        raise ConfigError(f"bad --methods {args.methods!r}: no method given")
    densities = items("--densities", args.densities, float)
    clip = items("--clip", args.clip, int) if args.clip else None
    if clip is not None and (len(clip) != 3 or min(clip) < 1):
        raise ConfigError(f"--clip needs F,H,W (three integers >= 1), got {args.clip!r}")
    speed = items("--vsopt-speedups", args.vsopt_speedups, str)
    vsopt_speedups = items("--vsopt-speedups", ",".join(v for v in speed if v != "match"), float)
    block = check_block_size(args.block, "--block")
    for option, value in (("--steps", args.steps), ("--clips", args.clips),
                          ("--calibration-steps", args.calibration_steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} {value}: must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = check_device(device)
    cost = CostModel.default(torch.cuda.get_device_name() if dev.type == "cuda" else None)
    check_cost_model_blocks(cost, {Quant.NONE, Quant(args.quant)}, block, "--block",
                            f"the shipped cost model ({cost.gpu})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a file; give a folder (bench.json and pareto.png go there)")
    try:
        settings = BenchSettings(methods=methods, densities=densities, quant=Quant(args.quant), block=block,
                                 steps=args.steps, clips=args.clips, clip=clip,
                                 calibration_steps=args.calibration_steps, step_plans=not args.no_step_plans,
                                 sensitivity=not args.no_sensitivity, vsopt_held_out=args.vsopt_held_out,
                                 vsopt_probe=args.vsopt_probe,
                                 vsopt_speedups=vsopt_speedups,
                                 vsopt_match="match" in speed, warmup_steps=args.warmup_steps,
                                 mask_refresh=args.mask_refresh,
                                 vsopt_warmup=items("--vsopt-warmup", args.vsopt_warmup, int),
                                 vsopt_refresh=items("--vsopt-refresh", args.vsopt_refresh, int),
                                 vsopt_pooled=not args.no_vsopt_pooled, renorm_every=args.renorm_every,
                                 vsopt_renorm=items("--vsopt-renorm", args.vsopt_renorm, int),
                                 vsopt_residual=items("--vsopt-residual", args.vsopt_residual, int),
                                 cluster_refresh=args.cluster_refresh,
                                 cluster_clusters=items("--cluster-clusters", args.cluster_clusters, int),
                                 vsopt_clusters=args.vsopt_clusters, time_limit_s=args.time_limit,
                                 timing=args.timing, vsopt_top_k=items("--vsopt-top-k", args.vsopt_top_k, float))
    except ConfigError as e:
        option = {"densities": "--densities", "vsopt_speedups": "--vsopt-speedups", "warmup_steps": "--warmup-steps",
                  "mask_refresh": "--mask-refresh", "renorm_every": "--renorm-every",
                  "vsopt_renorm": "--vsopt-renorm", "vsopt_residual": "--vsopt-residual",
                  "cluster_refresh": "--cluster-refresh",
                  "cluster_clusters": "--cluster-clusters", "time_limit_s": "--time-limit",
                  "calibration_steps": "--calibration-steps", "vsopt_top_k": "--vsopt-top-k",
                  "timing": "--timing"}
        name = next((o for key, o in option.items() if str(e).startswith(key)), "bench options")
        raise ConfigError(f"bad {name}: {e}") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {args.out!r}: cannot make the folder: {e}") from None
    return settings, device


def run_cli(args: argparse.Namespace) -> int:
    settings, device = _check_args(args)  # before the model is loaded

    from pathlib import Path

    import torch

    from vsopt.benchmark.report import plot_pareto, summary_table, write_json
    from vsopt.benchmark.sweep import bench
    from vsopt.models.model import load_shipped

    ref = load_shipped(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()
    out = Path(args.out)
    result = bench(ref, settings, partial=lambda r: write_json(r, out / "bench.json"))
    write_json(result, out / "bench.json")
    plot_pareto(result, out / "pareto.png")
    print(summary_table(result))
    print(f"wrote {out / 'bench.json'} and {out / 'pareto.png'}")
    return 0
