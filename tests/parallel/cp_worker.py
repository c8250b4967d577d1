"""Multi-process check of vsopt under diffusers' context parallelism on CPU processes (gloo).

    python tests/parallel/cp_worker.py --world 2 --cases ulysses,ring [--backend rewrite|inductor]

Spawns `world` processes (gloo); for each case each builds the same small WanTransformer3DModel
(seeded), computes the single-process result of the case's plan (torch.compile with vsopt's
passes, no context parallelism), then enables diffusers' context parallelism (Ulysses for
"ulysses", ring for "ring*", ring 2 x Ulysses world/2 for "unified"), compiles again with the
same plan and compares. Rank 0 prints one line `RESULT {json}` per case (max abs error over the
ranks, what the passes did; "refused" for a plan the passes must refuse); any failure raises,
and the exit status is nonzero. Used by tests/parallel/test_context_parallel.py.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

FRAMES = {"aligned": 4, "unaligned": 3}   # latent frames: 4x4x4 = 64 tokens, 3x4x4 = 48


def build_model(frames: int, layers: int = 2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                  rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, frames, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 5, 16, generator=g))
    return model, inputs


def make_plan(case: str, frames: int):
    """A plan for the attn1 sites mixing dense, skip, pattern, dynamic and quantized heads and orders."""
    from vsopt.core.dynamic import DynamicSpec
    from vsopt.core.ir import TokenGrid
    from vsopt.core.patterns import LocalWindow, TemporalDiagonals, VerticalStripes
    from vsopt.core.plan import HeadPlan, Plan, SitePlan

    b = {"block_m": 16, "block_n": 16}
    grid = TokenGrid(frames, 4, 4)
    n = grid.num_tokens
    window = HeadPlan(sparsity="pattern", pattern=LocalWindow(frames=1, height=1, width=1), **b)
    diagonals = HeadPlan(sparsity="pattern", pattern=TemporalDiagonals(spatial_radius=1), **b)
    stripes = HeadPlan(sparsity="pattern", pattern=VerticalStripes(key_frames=(0,)), **b)
    topk = HeadPlan(sparsity="dynamic", dynamic=DynamicSpec("top_k", 0.5), **b)
    mass = HeadPlan(sparsity="dynamic", dynamic=DynamicSpec("cumulative_mass", 0.9), **b)
    skip, dense = HeadPlan(sparsity="skip", **b), HeadPlan(**b)
    with_order = lambda hp, o: HeadPlan(**{**hp.__dict__, "order": o})  # noqa: E731
    if case == "ulysses":      # any order: every rank holds whole heads
        heads = [[HeadPlan(quant="int8", **b), skip, with_order(window, "hwf"), with_order(topk, "wfh")],
                 [diagonals, dense, mass, with_order(stripes, "whf")]]
    elif case == "ring":       # orders that keep frames together (the shards hold whole frames)
        heads = [[dense, skip, with_order(window, "fwh"), with_order(topk, "fwh")],
                 [diagonals, dense, mass, with_order(stripes, "fwh")]]
    elif case == "ring_unaligned":   # shards of 1.5 frames: model order, static masks only
        heads = [[dense, skip, window, stripes], [diagonals, dense, skip, window]]
    elif case == "ring_bad_order":
        heads = [[dense, skip, with_order(window, "hwf"), dense], [dense] * 4]
    else:
        raise SystemExit(f"unknown case {case!r}")
    return Plan({f"blocks.{i}.attn1": SitePlan(f"blocks.{i}.attn1", 4, n, n, grid, tuple(h))
                 for i, h in enumerate(heads)})


def compiled(model, plan, backend_name: str, reports: list):
    from vsopt.backend import trace_and_rewrite, vsopt_backend
    from vsopt.core.config import VsoptConfig

    options = {"plan": plan, "strict": False}

    def rewrite_only(gm, example_inputs):   # the passes, then the rewritten ATen graph as it is
        out_gm, report = trace_and_rewrite(gm, example_inputs, VsoptConfig.from_options(options))
        reports.append(report)
        return out_gm

    def inductor(gm, example_inputs):
        reports.append(trace_and_rewrite(gm, example_inputs, VsoptConfig.from_options({**options, "rewrite": False}))[1])
        return vsopt_backend(gm, example_inputs, options)

    torch._dynamo.reset()
    return torch.compile(model, backend=rewrite_only if backend_name == "rewrite" else inductor, fullgraph=True)


def worker(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0",
                      TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    try:
        for case in args.cases.split(","):
            result = run_case(case, args)
            if rank == 0:
                print("RESULT " + json.dumps({"case": case, **result}), flush=True)
    finally:
        dist.destroy_process_group()


def run_case(case: str, args) -> dict:
    from diffusers import ContextParallelConfig

    from vsopt.core.errors import PlanError
    from vsopt.parallel.diffusers_cp import enable_context_parallel

    frames = FRAMES["unaligned" if case.endswith("unaligned") else "aligned"]
    model, inputs = build_model(frames)
    plan = make_plan("ring" if case == "unified" else case, frames)
    mode = case.split("_")[0]
    with torch.no_grad():
        want = compiled(model, plan, "rewrite", [])(*inputs, return_dict=False)[0]
        dense = model(*inputs, return_dict=False)[0]   # eager, no plan: shows that the plan matters
        degrees = {"ulysses": {"ulysses_degree": args.world}, "ring": {"ring_degree": args.world},
                   "unified": {"ring_degree": 2, "ulysses_degree": args.world // 2}}[mode]
        if mode != "ulysses":
            model.set_attention_backend("_native_flash")   # ring needs the log-sum-exp; vsopt replaces it
        enable_context_parallel(model, ContextParallelConfig(**degrees))
        reports = []
        try:
            got = compiled(model, plan, args.backend, reports)(*inputs, return_dict=False)[0]
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if isinstance(e.inner_exception, PlanError):
                return {"refused": str(e.inner_exception)}
            raise
    err = torch.tensor([(got - want).abs().max().item()])
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    notes = [note for r in reports for p in r.passes if p.name in ("ring_attention", "ulysses_heads", "lower_plan")
             for note in p.notes]
    return {"max_abs_err": err.item(), "scale": want.abs().max().item(),
            "plan_vs_dense": (want - dense).abs().max().item(), "notes": notes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--cases", default="ulysses,ring",
                   help="comma-separated: ulysses, ring, ring_unaligned, ring_bad_order, unified")
    p.add_argument("--backend", choices=["rewrite", "inductor"], default="rewrite")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
