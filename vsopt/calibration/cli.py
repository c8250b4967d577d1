"""`vsopt calibrate`: measure a model's attention and write a plan. Light at import (no torch):
`vsopt --help` builds this parser.

run_cli checks every option that can be checked without the model first (budgets, precisions,
block size, step ranges, grid, device, cost model, output paths), each error one line naming the
option; then builds the model, then calibrates. A failure while building the model or tracing it
with the example inputs says which of the two failed, then the cause."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

QUANTS = "none,int8,fp8,int8_fp8,int8_int8"
USAGE = ("%(prog)s (MODULE:FACTORY | --reference) --out OUT.plan.json\n"
         "       (--max-error X | --density D | --speedup S | --min-psnr DB) [options]")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = USAGE
    p.add_argument("target", nargs="?", metavar="MODULE:FACTORY",
                   help="required unless --reference: MODULE:FACTORY or ./file.py:FACTORY; FACTORY() returns "
                        "(model, inputs), inputs a tuple of positional inputs or a list of such tuples")
    p.add_argument("--reference", action="store_true",
                   help="calibrate the shipped reference model over its sampler steps instead of a FACTORY")
    p.add_argument("--out", required=True,
                   help="plan JSON to write (masks go to a .safetensors file beside it; missing folders are made)")
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--max-error", type=float, metavar="X",
                   help="per-site budget: relative L2 of each attention output, in (0, 1)")
    b.add_argument("--density", type=float, metavar="D", help="overall block density to reach, in (0, 1]")
    b.add_argument("--speedup", type=float, metavar="S",
                   help="predicted attention speedup over dense to reach (cost model; fixed per-site costs of "
                        "dynamic masks, permutations and launches included); least weighted error under that time")
    b.add_argument("--min-psnr", type=float, metavar="DB",
                   help="end-to-end floor: PSNR (dB) of the model output on a held-out input (the last input; "
                        "with --reference a separate sampler run)")
    p.add_argument("--quant", default=QUANTS,
                   help="precisions the search may use, comma-separated (none, the exact fallback, is always "
                        "allowed; with --density or --speedup the first is used)")
    p.add_argument("--block", type=int, default=64, help="block size (query and key): a power of two, 16 to 256")
    p.add_argument("--no-reorder", action="store_true", help="keep every head in the model's token order")
    p.add_argument("--no-patterns", action="store_true", help="no static pattern candidates")
    p.add_argument("--no-dynamic", action="store_true", help="no dynamic-mask candidates")
    p.add_argument("--no-skip", action="store_true", help="never skip a head")
    p.add_argument("--error-inputs", type=int, default=None,
                   help="inputs per step range used to measure errors (default: all)")
    p.add_argument("--site-overhead-us", type=float, default=0.0,
                   help="a further per-site cost of lowering not in the cost model (us, e.g. permutations' and "
                        "gathers' host work); a site whose plan is predicted no faster than dense stays dense")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="the plan will run under CUDA graphs: price sites by the cost model's GPU time alone "
                        "(default: each lowered site is also charged the host overhead measured per kernel launch, "
                        "as torch.compile without CUDA graphs pays it)")
    p.add_argument("--step-ranges", default=None, metavar="START:STOP,...",
                   help="calibrate denoising step ranges separately, e.g. 0:4,4: (default: one plan for all steps)")
    p.add_argument("--steps", type=int, default=8, help="--reference: sampler steps")
    p.add_argument("--clips", type=int, default=2, help="--reference: clips sampled for calibration")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="--reference: the sampler's classifier-free guidance scale (1: none; `vsopt demo` samples "
                        "with 3): calibrate, and --check, on the trajectories the plan will run")
    p.add_argument("--size", default=None, metavar="FxHxW",
                   help="--reference: latent clip size to calibrate at (default: the checkpoint's, 16x32x32)")
    p.add_argument("--device", default=None, help="--reference: device (default: cuda if available, else cpu)")
    p.add_argument("--cost-model", default=None, help="cost-model JSON (default: the shipped one for this GPU)")
    p.add_argument("--grid", default=None, help="F,H,W[,text_before[,text_after]] for sites without an inferred grid")
    p.add_argument("--report", default=None, help="also write the per-site report as JSON here")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint of an interrupted run")
    p.add_argument("--check", action="store_true",
                   help="afterwards run the model with the plan on the first input, as the lowered graph and through "
                        "torch.compile(backend='vsopt'): print the output's error against dense, and times on a GPU")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("accuracy search (docs/CALIBRATION.md; all off by default; priced by the cost model "
                             "like every candidate)")
    g.add_argument("--pooled-remainder", action=argparse.BooleanOptionalAction, default=None,
                   help="also offer every candidate with its dropped key blocks attended mean-pooled (PSA) "
                        "(default: off)")
    g.add_argument("--renorm-every", default=None, metavar="R,..",
                   help="softmax-mass correction (Re-ttention) intervals >= 2 the search may choose; needs inputs "
                        "from one sampler run (--reference, or RecordedCalls); empty: none "
                        "(default: none)")
    g.add_argument("--residual-every", default=None, metavar="R,..",
                   help="residual sharing (DiTFastAttn) intervals >= 2 the search may choose; needs inputs as "
                        "--renorm-every does")
    g.add_argument("--dense-warmup", default=None, metavar="K,..",
                   help="first K steps the search may run dense; each K must end a --step-range from 0; only "
                        "--density and --speedup use it (a per-site budget gains nothing from dense steps)")
    g.add_argument("--mask-refresh", default=None, metavar="R,..",
                   help="refresh intervals >= 2 of reused dynamic masks (AdaSpa); needs inputs as --renorm-every does")
    g.add_argument("--top-k", default=None, metavar="F,..",
                   help="top-k fractions in (0, 1] of key blocks per query row of dynamic candidates "
                        "(default: none; bench's vsopt method uses 0.1,0.2,0.3,0.4,0.5)")
    g.add_argument("--sensitivity", action="store_true",
                   help="--reference, with --density or --speedup: weigh each site's error at each step by how much "
                        "it moves the sampler's final output, measured first on the calibration run (the first one "
                        "with --held-out-errors; --sensitivity-probe's probe; sites x steps extra forwards plus the "
                        "dense continuations)")
    g.add_argument("--sensitivity-probe", choices=("topk", "pooled"), default=None,
                   help="--sensitivity: the error each site is probed with: topk, block top-k 0.5 (default); pooled, "
                        "top-k at the --density budget (with --speedup at 0.2) with the dropped blocks attended "
                        "mean-pooled, the error kind pooled-remainder plans make (the bench's --vsopt-probe)")
    g.add_argument("--held-out-errors", action="store_true",
                   help="measure candidate errors on other inputs than the masks are made from: block mass on the "
                        "first half of each step range's inputs, errors on the rest; with --reference a second "
                        "sampler run of --clips other clips is recorded for the errors; a FACTORY needs 2 or more "
                        "inputs per step range")
    g.add_argument("--clusters", default=None, metavar="TOP_P,..",
                   help="also offer k-means cluster heads (Sparse VideoGen 2) keeping these top-p shares in (0, 1] of "
                        "the key clusters' centroid score; query and key clusters one per kernel block of the "
                        "smallest calibrated site's video tokens")
    g.add_argument("--cluster-refresh", type=int, default=None, metavar="N",
                   help="--clusters: recompute each head's clustering every N denoising steps, warm-started from "
                        "the last one (default 1: every step)")


def parse_step_ranges(text: str, option: str = "--step-ranges") -> tuple[tuple[int, int | None], ...]:
    """'0:4,4:' -> ((0, 4), (4, None)), checked (CalibrationOptions' rule); errors name `option`."""
    from vsopt.calibration.options import check_step_ranges
    from vsopt.core.errors import ConfigError

    out = []
    for part in text.split(","):
        a, sep, b = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            out.append((int(a or 0), int(b) if b.strip() else None))
        except ValueError:
            raise ConfigError(f"{option}: {part!r} is not START:STOP (e.g. 0:4,4:)") from None
    return check_step_ranges(out, option)


@dataclass(frozen=True)
class Checked:
    """The options as run_cli uses them, checked before any model is built."""

    quants: tuple
    grid: Any
    cost: Any
    options: Any  # CalibrationOptions (its clusters made in run_cli, from the traced sites)
    budget: Any  # the budget, or for --min-psnr the floor's value (its held-out input comes with the model)
    device: str | None
    cluster_top_p: tuple = ()  # --clusters
    cluster_refresh: int = 1  # --cluster-refresh


def check_args(args: argparse.Namespace) -> Checked:
    """Everything that can be checked without the model, each error a ConfigError naming the option."""
    from pathlib import Path

    import torch

    from vsopt.calibration.budgets import DensityBudget, QualityFloor, SiteErrorBudget, SpeedupBudget
    from vsopt.calibration.failures import one_line
    from vsopt.calibration.search_flags import flag_error
    from vsopt.calibration.options import (CalibrationOptions, check_block_size, check_cost_model_blocks,
                                           check_device, check_overhead)
    from vsopt.core.costmodel import CostModel
    from vsopt.core.errors import ConfigError
    from vsopt.core.ir import TokenGrid
    from vsopt.core.orders import TokenOrder
    from vsopt.core.plan import Quant

    if args.size and not args.reference:
        raise ConfigError("--size applies to --reference only (a FACTORY makes its own inputs)")
    if args.size:
        _clip_size(args.size)
    if args.reference and args.target:
        raise ConfigError(f"give MODULE:FACTORY or --reference, not both (got {args.target!r} and --reference)")
    if not args.reference and not args.target:
        raise ConfigError("give MODULE:FACTORY (the model to calibrate) or --reference")
    names = [q.strip() for q in args.quant.split(",") if q.strip()]
    if not names:
        raise ConfigError(f"--quant {args.quant!r}: no precision given; valid: {[q.value for q in Quant]}")
    try:
        given = tuple(dict.fromkeys(Quant(q) for q in names))
    except ValueError as e:
        raise ConfigError(f"--quant {args.quant!r}: {e}; valid: {[q.value for q in Quant]}") from None
    quants = given if Quant.NONE in given else (*given, Quant.NONE)
    block = check_block_size(args.block, "--block")
    if args.error_inputs is not None and args.error_inputs < 1:
        raise ConfigError(f"--error-inputs {args.error_inputs}: must be >= 1")
    overhead = check_overhead(args.site_overhead_us, "--site-overhead-us")
    step_ranges = parse_step_ranges(args.step_ranges) if args.step_ranges is not None else None
    for option, value in (("--steps", args.steps), ("--clips", args.clips)):
        if value < 1:
            raise ConfigError(f"{option} {value}: must be >= 1")
    if not math.isfinite(args.guidance) or args.guidance <= 0:
        raise ConfigError(f"--guidance {args.guidance}: must be a finite scale > 0 (1: no guidance)")
    grid = None
    if args.grid:
        try:
            grid = TokenGrid(*(int(v) for v in args.grid.split(",")))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--grid {args.grid!r}: expected F,H,W[,text_before[,text_after]] ({e})") from None
    device = args.device
    if device is not None:
        check_device(device)
    # budgets (a --min-psnr floor's held-out input comes with the model: its value is checked here)
    try:
        if args.max_error is not None:
            budget = SiteErrorBudget(args.max_error)
        elif args.density is not None:
            budget = DensityBudget(args.density, given[0])
        elif args.speedup is not None:
            budget = SpeedupBudget(args.speedup, given[0])
        else:
            budget = QualityFloor((), args.min_psnr).value
    except ConfigError as e:
        option = next(o for o, v in (("--max-error", args.max_error), ("--density", args.density),
                                     ("--speedup", args.speedup), ("--min-psnr", args.min_psnr)) if v is not None)
        raise ConfigError(f"{option}: {e}") from None
    # the cost model, and that it has timings at this block size for every precision offered
    try:
        cost = CostModel.load(args.cost_model) if args.cost_model else \
            CostModel.default(torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    except OSError as e:
        raise ConfigError(f"--cost-model {args.cost_model!r}: {one_line(e)}") from None
    except ConfigError as e:
        raise ConfigError(f"--cost-model: {e}") from None
    source = f"--cost-model {args.cost_model!r}" if args.cost_model else f"the shipped cost model ({cost.gpu})"
    check_cost_model_blocks(cost, quants, block, "--block", source)
    # output paths: not folders; their folders are made now (the checkpoint is written beside the plan)
    for option, path in (("--out", args.out), ("--report", args.report)):
        if path is None:
            continue
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{option} {path!r} is a folder; give a file path (e.g. {p / 'model.plan.json'})")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{option} {path!r}: cannot make its folder: {one_line(e)}") from None
    search = _search_fields(args)
    top_p, refresh = _cluster_flags(args)
    try:
        options = CalibrationOptions(
            block_m=block, block_n=block, quants=quants,
            orders=() if args.no_reorder else tuple(TokenOrder), patterns=not args.no_patterns,
            dynamic=not args.no_dynamic, skip=not args.no_skip, error_inputs=args.error_inputs,
            site_overhead_us=overhead, host_overhead=not args.cuda_graphs,
            model_order_candidates=args.speedup is not None,
            step_ranges=step_ranges, cost_model=cost, **search)
    except ConfigError as e:
        raise flag_error(e) from None
    return Checked(quants, grid, cost, options, budget, device, top_p, refresh)


def _cluster_flags(args: argparse.Namespace) -> tuple[tuple[float, ...], int]:
    """(--clusters top-p values, --cluster-refresh), checked; the specs need the model's sites
    (run_cli makes them with calibration.clusters.cluster_candidates)."""
    from vsopt.calibration.search_flags import parse_list
    from vsopt.core.errors import ConfigError

    top_p = parse_list(args.clusters, "--clusters", float)
    if not all(0.0 < p <= 1.0 for p in top_p):
        raise ConfigError(f"--clusters {args.clusters!r}: top-p values must lie in (0, 1]")
    if args.cluster_refresh is not None and not top_p:
        raise ConfigError("--cluster-refresh: only with --clusters (it is the cluster heads' refresh interval)")
    refresh = 1 if args.cluster_refresh is None else args.cluster_refresh
    if refresh < 1:
        raise ConfigError(f"--cluster-refresh {refresh}: must be an integer >= 1 (steps one clustering serves)")
    return tuple(dict.fromkeys(top_p)), refresh


def _search_fields(args: argparse.Namespace) -> dict:
    """CalibrationOptions' accuracy-search fields from the flags (none by default), each error
    naming its flag."""
    from vsopt.calibration.search_flags import parse_list, search_fields
    from vsopt.core.errors import ConfigError

    # Off unless asked, also with --reference: priced by what they run since session 11, the demo
    # plan's search with them offered equals the plain search's within noise (docs/CALIBRATION.md)
    pooled = bool(args.pooled_remainder)
    renorm = parse_list(args.renorm_every, "--renorm-every")
    top_k = parse_list(args.top_k, "--top-k", float)
    if not all(0.0 < x <= 1.0 for x in top_k):
        raise ConfigError(f"--top-k {args.top_k!r}: fractions must lie in (0, 1]")
    warmup = parse_list(args.dense_warmup, "--dense-warmup")
    if warmup and args.density is None and args.speedup is None:
        raise ConfigError("--dense-warmup: a per-site budget (--max-error, --min-psnr) gains nothing from dense "
                          "steps; use it with --density or --speedup")
    if args.sensitivity and not args.reference:
        raise ConfigError("--sensitivity: needs --reference (it is measured on the shipped model's sampler run)")
    if args.sensitivity and args.density is None and args.speedup is None:
        raise ConfigError("--sensitivity: a per-site budget (--max-error, --min-psnr) does not weigh errors; use it "
                          "with --density or --speedup")
    if args.sensitivity_probe is not None and not args.sensitivity:
        raise ConfigError("--sensitivity-probe: only with --sensitivity (it is how the sensitivity weights are "
                          "measured)")
    return search_fields(pooled=pooled, renorm=renorm, residual=parse_list(args.residual_every, "--residual-every"),
                         warmup=warmup, refresh=parse_list(args.mask_refresh, "--mask-refresh"), top_k=top_k,
                         held_out=args.held_out_errors)


def _check_step_inputs(options, inputs) -> None:
    """A FACTORY's inputs hold denoising steps only as RecordedCalls (record_forward_inputs over a
    sampler run): plain tuples are numbered 0, 1, ... and would pass for consecutive steps."""
    from vsopt.calibration.capture import RecordedCall
    from vsopt.core.errors import ConfigError

    for field, flag in (("renorm_every", "--renorm-every"), ("residual_every", "--residual-every"),
                        ("mask_refresh", "--mask-refresh"), ("dense_warmup", "--dense-warmup")):
        if getattr(options, field) and not all(isinstance(x, RecordedCall) for x in inputs):
            raise ConfigError(f"{flag}: needs the inputs of one sampler run with their denoising steps: the FACTORY "
                              f"must return RecordedCalls (vsopt.calibration.record_forward_inputs), not tuples")


def _clip_size(text: str) -> tuple[int, int, int]:
    from vsopt.core.errors import ConfigError

    dims = text.lower().split("x")
    if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise ConfigError(f"--size {text!r}: expected FRAMESxHEIGHTxWIDTH of the latent clip, e.g. 16x64x64")
    return tuple(int(d) for d in dims)


def _factory_inputs(target: str):
    """(model, list of calibration inputs) from MODULE:FACTORY: a tuple of inputs is one
    calibration call, a list holds several. A failure says it happened building the model."""
    from vsopt.calibration.failures import step_failed
    from vsopt.core.errors import ConfigError
    from vsopt.io import load_target

    try:
        made = load_target(target)
    except ConfigError as e:
        raise step_failed("building the model", e) from e
    if isinstance(made.inputs, list):
        return made.model, list(made.inputs)
    return made.model, [made.inputs]  # a tuple of positional inputs (or one tensor) is one call


def run_cli(args: argparse.Namespace) -> int:
    checked = check_args(args)  # before anything is built or traced

    import dataclasses

    import torch

    from vsopt.calibration.budgets import QualityFloor
    from vsopt.calibration.check import check_plan, reference_sampler_check
    from vsopt.calibration.failures import step_failed
    from vsopt.calibration.inputs import as_recorded, range_of, reference_model_inputs
    from vsopt.calibration.run import calibrate, calibrated_sites, held_out_shortfall
    from vsopt.core.errors import ConfigError
    from vsopt.io import atomic_write_json

    budget = checked.budget
    if args.reference:
        from vsopt.models import model as model_lib

        device = checked.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            ref = model_lib.load_shipped(device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
        except Exception as e:  # noqa: BLE001 - the environment or the checkpoint: name the step, then the cause
            raise step_failed("building the reference model", e) from e
        if args.size:  # the sampler runs (inputs and --check) follow the config's clip size
            f, h, w = _clip_size(args.size)
            ref.config = dataclasses.replace(ref.config, frames=f, height=h, width=w)
        model = ref.transformer
        inputs = reference_model_inputs(ref, clips=args.clips, steps=args.steps, seed=0, guidance=args.guidance)
        if args.held_out_errors:  # pass 2's own run: other clips and noise (seed 1 is --min-psnr's)
            second = reference_model_inputs(ref, clips=args.clips, steps=args.steps, seed=2, guidance=args.guidance)
            inputs += [dataclasses.replace(c, index=len(inputs) + c.index) for c in second]
        if args.min_psnr is not None:
            held_out = reference_model_inputs(ref, clips=1, steps=args.steps, seed=1, guidance=args.guidance)
            budget = QualityFloor(held_out[args.steps // 2], budget)
    else:
        model, inputs = _factory_inputs(args.target)
        _check_step_inputs(checked.options, inputs)
        if args.min_psnr is not None:
            if len(inputs) < 2:
                raise ConfigError("--min-psnr needs at least two inputs from the FACTORY: the last one is held out")
            budget = QualityFloor(inputs.pop(), budget)
        if args.held_out_errors:  # before anything is measured
            short = held_out_shortfall([range_of(as_recorded(x, i).step, checked.options.step_ranges)
                                        for i, x in enumerate(inputs)], checked.options.step_ranges)
            if short:
                raise ConfigError(f"--held-out-errors {short}")
    options = checked.options
    if checked.cluster_top_p:  # cluster counts from the sites calibrate will see
        from vsopt.calibration.clusters import cluster_candidates

        specs = cluster_candidates(calibrated_sites(model, inputs, checked.grid), options.block_m,
                                   checked.cluster_top_p, refresh=checked.cluster_refresh)
        options = dataclasses.replace(options, clusters=specs)
    if args.sensitivity:  # the weights of the first sampler run (one call per step)
        from vsopt.calibration.sensitivity import probe_text, sampler_sensitivity, sensitivity_probe

        # the pooled probe at the lowest density the plan runs: the budget's, or with --speedup the
        # density the search compares token orders at
        probe = sensitivity_probe(options.block_m, args.density or options.order_density, pooled=True) \
            if args.sensitivity_probe == "pooled" else None
        if not args.quiet:
            print(f"calibrate: measuring the output's sensitivity to each site at each of {args.steps} steps "
                  f"({probe_text(probe)} probe)")
        weights = sampler_sensitivity(model, inputs[:args.steps], options.block_m, probe, guidance=args.guidance,
                                      grid=checked.grid)
        options = dataclasses.replace(options, error_weights=weights, error_weights_probe=probe_text(probe))
    sampling = {"steps": args.steps, "guidance": args.guidance} if args.reference else None
    result = calibrate(model, inputs, budget, options=options, out=args.out, resume=not args.no_resume,
                       progress=not args.quiet, grid=checked.grid, sampling=sampling)
    print(result.table())
    print(f"plan written to {args.out}")
    result_dict = result.to_dict()
    if args.check:
        check = check_plan(model, as_recorded(inputs[0], 0), args.out, checked.grid, cudagraphs=args.cuda_graphs)
        if args.reference:
            check.update(reference_sampler_check(ref, args.out, clips=args.clips, steps=args.steps,
                                                 guidance=args.guidance))
        print("plan check on the first input: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()))
        result_dict["plan_check"] = check
    if args.report:
        atomic_write_json(args.report, result_dict)
    return 0
