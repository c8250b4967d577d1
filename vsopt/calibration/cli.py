"""`vsopt calibrate`: measure a model's attention and write a plan. Light at import (no torch):
`vsopt --help` builds this parser."""
from __future__ import annotations

import argparse

QUANTS = "none,int8,fp8,int8_fp8"


def _parse_ranges(text: str) -> tuple[tuple[int, int | None], ...]:
    from vsopt.core.errors import ConfigError

    out = []
    for part in text.split(","):
        a, _, b = part.partition(":")
        try:
            out.append((int(a or 0), int(b) if b else None))
        except ValueError:
            raise ConfigError(f"--step-ranges: {part!r} is not START:STOP (e.g. 0:4,4:)") from None
    return tuple(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", help="MODULE:FACTORY or ./file.py:FACTORY; FACTORY() returns (model, inputs), "
                                             "inputs a tuple of positional inputs or a list of such tuples")
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
    p.add_argument("--quant", default=QUANTS,
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


def _factory_inputs(target: str):
    """(model, list of calibration inputs) from MODULE:FACTORY: a tuple of inputs is one
    calibration call, a list holds several."""
    from vsopt.io import load_target

    made = load_target(target)
    if isinstance(made.inputs, list):
        return made.model, list(made.inputs)
    return made.model, [made.inputs]  # a tuple of positional inputs (or one tensor) is one call


def run_cli(args: argparse.Namespace) -> int:
    import torch

    from vsopt.calibration.budgets import DensityBudget, QualityFloor, SiteErrorBudget, SpeedupBudget
    from vsopt.calibration.check import check_plan, reference_sampler_check
    from vsopt.calibration.inputs import as_recorded, reference_model_inputs
    from vsopt.calibration.options import CalibrationOptions
    from vsopt.calibration.run import calibrate
    from vsopt.core.costmodel import CostModel
    from vsopt.core.errors import ConfigError
    from vsopt.core.ir import TokenGrid
    from vsopt.core.orders import TokenOrder
    from vsopt.core.plan import Quant
    from vsopt.io import atomic_write_json

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
        model, inputs = _factory_inputs(args.target)
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
    result_dict = result.to_dict()
    if args.check:
        check = check_plan(model, as_recorded(inputs[0], 0), args.out, grid)
        if args.reference:
            check.update(reference_sampler_check(ref, args.out, clips=args.clips, steps=args.steps))
        print("plan check on the first input: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()))
        result_dict["plan_check"] = check
    if args.report:
        atomic_write_json(args.report, result_dict)
    return 0
