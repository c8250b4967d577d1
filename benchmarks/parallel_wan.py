"""Wan2.1 transformer forward under diffusers' context parallelism on N GPUs: dense Ulysses (the
engine as users run it) against vsopt plans, with and without head balancing, and ring attention.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 4 benchmarks/parallel_wan.py --model 14b            # 720p, 75,600 tokens
    torchrun --nproc-per-node 1 benchmarks/parallel_wan.py --model 14b                # the one-GPU rows
    python3 benchmarks/parallel_wan.py --dry-run                                      # CPU, gloo, tiny model

Methods (--methods, comma-separated; those that need several ranks are skipped on one):
  dense           blocks compiled by Inductor, diffusers' native attention (one GPU: no parallelism;
                  N GPUs: ContextParallelConfig(ulysses_degree=N))
  vsopt           blocks compiled by backend="vsopt" with the plan (Ulysses on N GPUs)
  vsopt-balanced  the same after head balancing (vsopt.parallel.balance: the projections' heads and the
                  plan permuted per site; its predicted per-rank times are reported)
  ring-dense      ring_degree=N, diffusers' _native_flash backend (ring needs the log-sum-exp)
  ring-vsopt      ring_degree=N with the plan (passes.ring_attention); a plan the ring cannot run (an
                  order that crosses shards, dynamic heads on unaligned shards) is reported, not run
The model: the real Wan2.1-14B config (40 layers, 40 heads of 128) at 720p / 81 frames (latents
21x90x160 -> 21x45x80 = 75,600 tokens), or --model 1.3b at 480p (32,760 tokens), random bf16
weights, 512 text tokens. Blocks are compiled one by one (regional compilation, each block with its
own plan entries). The plan: --plan FILE (site ids blocks.{i}.attn1), else a synthetic static plan
(seeded mix of local windows, temporal diagonals, radial, dense and skipped heads: uneven densities
across heads, as calibrated plans have).

Per method: median forward time (CUDA events, after warm-up), per rank the profiled kernel time
split into NCCL (communication, waits included) and the rest (compute), and the cosine of the
output against the one-GPU run of the same model and plan (rank 0 computes it first; --no-reference
skips it). Rank 0 writes --out (JSON, atomically). Every process sets NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 before torch.distributed starts.
"""
from __future__ import annotations

import os

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v   # NVLink multicast off in every process (the machines' NVLS is not usable)

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from vsopt.core.timing import time_calls  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("dense", "vsopt", "vsopt-balanced", "ring-dense", "ring-vsopt")
WAN = {
    "14b": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6),
    "1.3b": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6),
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                 text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
}
LATENTS = {"14b": (21, 90, 160), "1.3b": (21, 60, 104), "tiny": (4, 8, 8)}   # frames, height, width


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(WAN), default="14b")
    p.add_argument("--latents", type=int, nargs=3, metavar=("F", "H", "W"), default=None,
                   help="latent frames/height/width (default: the model's 720p or 480p size)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--plan", default=None, help="a .plan.json for the model (site ids blocks.{i}.attn1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic plan")
    p.add_argument("--block", type=int, default=128, help="block size of the synthetic plan")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-reference", action="store_true", help="skip the one-GPU run (no cosine)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-rank kernel profile")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/parallel_wan_<model>_<N>gpu.json)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, gloo, the tiny model, float32, one iteration, graphs not compiled by Inductor: "
                        "checks the script, not the speed")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.dry_run:
        args.model, args.block, args.warmup, args.iters, args.no_profile = "tiny", 16, 0, 1, True
    if args.warmup < 0 or args.iters < 1:
        p.error("--warmup must be >= 0 and --iters >= 1")
    return args


def init_distributed(dry_run: bool) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:   # plain python: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29561"))
    cuda = torch.cuda.is_available() and not dry_run
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu")


def build_model(args, device, dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        return WanTransformer3DModel(**WAN[args.model]).to(dtype=dtype).eval()


def make_inputs(args, device, dtype):
    cfg = WAN[args.model]
    f, h, w = args.latents or LATENTS[args.model]
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, cfg["in_channels"], f, h, w, generator=g).to(device, dtype)
    text = torch.randn(1, 5 if args.model == "tiny" else 512, cfg["text_dim"], generator=g).to(device, dtype)
    return latents, torch.tensor([500], device=device), text


def synthetic_plan(args, grid, heads: int, layers: int):
    """A seeded static plan with uneven head densities (static heads run under Ulysses and ring)."""
    from vsopt.core.patterns import LocalWindow, Radial, TemporalDiagonals
    from vsopt.core.plan import HeadPlan, Plan, SitePlan

    rng = random.Random(args.seed)
    b = {"block_m": args.block, "block_n": args.block}
    palette = [HeadPlan(**b), HeadPlan(sparsity="skip", **b)] + [
        HeadPlan(sparsity="pattern", pattern=p, **b) for p in (
            LocalWindow(frames=1, height=max(1, grid.height // 4), width=max(1, grid.width // 4)),
            LocalWindow(frames=3, height=max(1, grid.height // 3), width=max(1, grid.width // 3)),
            TemporalDiagonals(spatial_radius=2), Radial(spatial_radius=max(1, grid.width // 8)))]
    weights = [0.1, 0.05, 0.3, 0.2, 0.2, 0.15]
    n = grid.num_tokens
    sites = {}
    for i in range(layers):
        sid = f"blocks.{i}.attn1"
        sites[sid] = SitePlan(sid, heads, n, n, grid, tuple(rng.choices(palette, weights, k=heads)))
    return Plan(sites, {"benchmark": "parallel_wan", "synthetic_seed": args.seed})


def block_plans(plan, layers: int) -> list:
    """Per block, the plan with its site ids relative to the block (regional compilation)."""
    from vsopt.core.plan import Plan

    out = []
    for i in range(layers):
        prefix = f"blocks.{i}."
        sites = {sid[len(prefix):]: sp for sid, sp in plan.sites.items() if sid.startswith(prefix)}
        out.append(Plan({k: type(sp)(k, sp.num_heads, sp.q_len, sp.kv_len, sp.grid, sp.heads, sp.steps)
                         for k, sp in sites.items()}, plan.meta))
    return out


INDUCTOR = True   # --dry-run: the graphs run as traced (vsopt's passes without Inductor's C++ compile)


def vsopt_recording(options: dict, reports: list):
    """backend="vsopt" for plans without step ranges (vsopt.backend.vsopt_backend's path), keeping
    each graph's PipelineReport so the benchmark can tell which planned sites were lowered."""
    from vsopt.backend import trace_and_rewrite
    from vsopt.core.config import VsoptConfig
    from vsopt.inductor import compile_fx   # as vsopt_backend: Inductor without its own attention fusion

    def backend(gm, example_inputs):
        aten_gm, report = trace_and_rewrite(gm, example_inputs, VsoptConfig.from_options(options))
        reports.append(report)
        return compile_fx(aten_gm, list(example_inputs)) if INDUCTOR else aten_gm

    return backend


def compile_blocks(model, plan, backend: str, grid=None, reports: list | None = None):
    """Each block compiled on its own (its own plan entries under vsopt, and the video grid: a block
    alone has no patch embedding to infer it from); the blocks share one code object, so Dynamo's
    per-code cache must hold one entry per block."""
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 4 * len(model.blocks)))
    plans = block_plans(plan, len(model.blocks)) if plan is not None else [None] * len(model.blocks)
    for block, p in zip(model.blocks, plans):
        if backend == "vsopt":
            block.compile(backend=vsopt_recording({"plan": p, "grid": grid}, [] if reports is None else reports),
                          fullgraph=False, dynamic=False)
        else:
            block.compile(backend=backend if INDUCTOR else "eager", fullgraph=False, dynamic=False)
    return model


def kernel_split(fn, device) -> dict[str, float]:
    """One profiled forward: GPU kernel time in NCCL kernels (communication and waits) and in the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    comm = comp = 0.0
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if e.key.lower().startswith("nccl") or "nccl" in e.key.lower():
            comm += us
        elif "memcpy" not in e.key.lower() and "memset" not in e.key.lower():
            comp += us
    return {"comm_ms": comm / 1e3, "compute_ms": comp / 1e3}


def main(argv=None) -> int:
    global INDUCTOR
    args = parse_args(argv)
    INDUCTOR = not args.dry_run
    rank, world, device = init_distributed(args.dry_run)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    from diffusers import ContextParallelConfig

    from vsopt.core.costmodel import CostModel
    from vsopt.core.io import atomic_write_json
    from vsopt.core.ir import TokenGrid
    from vsopt.core.plan import Plan
    from vsopt.parallel.balance import apply_head_order, balance_heads
    from vsopt.parallel.diffusers_cp import enable_context_parallel

    cfg = WAN[args.model]
    f, h, w = args.latents or LATENTS[args.model]
    grid = TokenGrid(f, h // 2, w // 2)
    heads, layers = cfg["num_attention_heads"], cfg["num_layers"]
    plan = Plan.load(args.plan) if args.plan else synthetic_plan(args, grid, heads, layers)
    inputs = make_inputs(args, device, dtype)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    say(f"{args.model} at {grid} = {grid.num_tokens} tokens, {heads} heads x {layers} layers, {world} rank(s), "
        f"device {device}, methods {args.methods}")

    if args.dry_run:   # the shipped cost model has no 16x16 blocks at head_dim 16: a flat one for the dry run
        keys = [f"{q}/d{cfg['attention_head_dim']}/{args.block}x{args.block}" for q in ("none", "int8", "fp8", "int8_fp8")]
        cost = CostModel("dry-run", {k: 10.0 for k in keys}, {k: 1.0 for k in keys}, {k: 0.1 for k in keys})
    else:
        cost = CostModel.default(torch.cuda.get_device_name() if device.type == "cuda" else None)
    results = {"model": args.model, "grid": str(grid), "tokens": grid.num_tokens, "world": world,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "plan": args.plan or f"synthetic seed {args.seed}, blocks {args.block}",
               "methods": {}}
    balance = None
    if world > 1 or args.dry_run:
        degree = world if world > 1 else 2
        balance = balance_heads(plan, degree, head_dim=cfg["attention_head_dim"], dtype=dtype, cost=cost)
        say(balance.report())
        results["head_balance"] = balance.to_dict()

    references = {}

    def run_method(method: str) -> dict:
        parallel = world > 1
        if method.startswith("ring") and not parallel or method == "vsopt-balanced" and balance is None:
            return {"skipped": "needs several ranks"}
        if method == "ring-dense" and device.type != "cuda":
            return {"skipped": "diffusers' ring runs _native_flash (a CUDA attention returning its log-sum-exp)"}
        model = build_model(args, device, dtype)
        use_plan = None if method in ("dense", "ring-dense") else plan
        if method == "vsopt-balanced":
            apply_head_order(model, balance.orders)
            use_plan = balance.apply(plan)
        if method == "ring-dense" or method == "ring-vsopt":
            model.set_attention_backend("_native_flash")
        ref_key = "dense" if use_plan is None else "vsopt"
        if not args.no_reference and parallel and ref_key not in references:
            if rank == 0:   # the one-GPU run of the same model and plan (balanced: numerically the same)
                one = compile_blocks(copy.deepcopy(model), use_plan, "vsopt" if use_plan is not None else "inductor",
                                     grid)
                with torch.no_grad():
                    references[ref_key] = one(*inputs, return_dict=False)[0].float().cpu()
                del one
            else:
                references[ref_key] = None
            dist.barrier()
        if parallel:
            degrees = {"ring_degree": world} if method.startswith("ring") else {"ulysses_degree": world}
            enable_context_parallel(model, ContextParallelConfig(**degrees))
        torch._dynamo.reset()
        reports: list = []
        compile_blocks(model, use_plan, "vsopt" if use_plan is not None else "inductor", grid, reports)

        def fwd():
            with torch.no_grad():
                return model(*inputs, return_dict=False)[0]

        try:
            out = fwd()
        except torch._dynamo.exc.BackendCompilerFailed as e:
            return {"unsupported": f"{type(e.inner_exception).__name__}: {e.inner_exception}"}
        times = time_calls(fwd, args.iters, warmup=args.warmup, cuda=device.type == "cuda")
        row = {"median_ms": statistics.median(times), "times_ms": times}
        if use_plan is not None:   # planned sites some pass left as they were (should be none)
            row["planned_sites_left"] = sorted({f"{s.site_id}: {s.reason}" for r in reports for s in r.skipped
                                                if s.site_id in {"attn1"}})
            row["graphs"] = len(reports)
        per_rank = {"median_ms": row["median_ms"]}
        if device.type == "cuda" and not args.no_profile:
            per_rank.update(kernel_split(fwd, device))
        gathered = [None] * world
        dist.all_gather_object(gathered, per_rank)
        row["per_rank"] = gathered
        if all("comm_ms" in g for g in gathered):
            row["comm_share"] = [g["comm_ms"] / max(1e-9, g["comm_ms"] + g["compute_ms"]) for g in gathered]
        ref = references.get(ref_key)
        if rank == 0 and ref is not None:
            o = out.float().cpu().flatten()
            row["cosine_vs_one_gpu"] = float(torch.nn.functional.cosine_similarity(o, ref.flatten(), dim=0))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row

    for method in args.methods:
        row = run_method(method)
        results["methods"][method] = row
        say(f"{method:>15}: " + (f"median {row['median_ms']:.1f} ms" if "median_ms" in row else str(row))
            + (f", cosine vs one GPU {row['cosine_vs_one_gpu']:.6f}" if "cosine_vs_one_gpu" in row else ""))
    dense = results["methods"].get("dense", {}).get("median_ms")
    for m, row in results["methods"].items():
        if dense and "median_ms" in row:
            row["speedup_vs_dense"] = dense / row["median_ms"]
    if rank == 0 and not args.dry_run or rank == 0 and args.out:
        out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"parallel_wan_{args.model}_{world}gpu.json"
        atomic_write_json(out, results)
        say(f"wrote {out}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
