"""Where a lowered attention site's host time goes, and what it costs a compiled model per site.

    python3 benchmarks/host_overhead.py --cpu [--out host_overhead_cpu.json]        # here, no GPU
    source benchmarks/gpu_env.sh
    python3 benchmarks/host_overhead.py --gpu --out $OUT/host_overhead_h200.json    # ~2-3 min on an H200
    python3 benchmarks/host_overhead.py --apply host_overhead_h200.json --to vsopt/costmodels/h200.json

The model: S blocks (qkv projection, attention over a 16x16x16 grid = 4096 tokens, out
projection), batch 2, 4 heads of 64, one plan entry per block; variants of the plan by launch
groups (vsopt.core.semantics.launch_groups: heads of different precisions are different launches)
and by permutation (per-head token orders), against no plan (vsopt.attention: SDPA).

--cpu (what this machine can say; nothing here is a GPU time):
  counts: per lowered site, in the graph the backend hands Inductor (vsopt.backend.trace_and_rewrite
    + vsopt.inductor.prepare), the vsopt ops (custom ops: Python on every call), the
    block-sparse launches and the ATen ops; and the same graph traced as Inductor traces it on a
    fake CUDA device (the triton_op bodies opened: Triton kernel launches, quantization kernels
    and the work order's ATen ops included), with and without the permutation inlining;
  host_us: one call of the lowered graph (eager, generated Python) on CPU tensors with every
    block-sparse kernel replaced by a no-op (the reference would dominate), minus the same graph
    with the sites dense (SDPA at a small size), per site: the Python and dispatch work of a
    site's ops, a proxy of the host work per call (not the time under Inductor).
--gpu: the model compiled with torch.compile(backend="vsopt") without and with CUDA graphs
  (options cudagraphs), per variant: wall time of back-to-back calls and GPU time (the same
  compiled call replayed from a CUDA graph); per site overhead = ((wall - gpu) planned - (wall -
  gpu) dense) / S; fitted as base + per further launch group + permuted, the cost model's
  overhead_us terms (vsopt.core.costmodel: "eager", "eager_per_launch", "eager_permuted", and the
  same with "cudagraphs"). --apply writes them into a cost-model JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import vsopt.core  # noqa: E402,F401  (registers the ops)
from vsopt.core.io import atomic_write_text  # noqa: E402
from vsopt.core.orders import TokenOrder  # noqa: E402
from vsopt.core.patterns import LocalWindow  # noqa: E402
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity  # noqa: E402
from vsopt.core.semantics import launch_groups, reorders  # noqa: E402
from vsopt.core.timing import pipelined_us  # noqa: E402

HEADS, HEAD_DIM, BATCH = 4, 64, 2
GRID = (16, 16, 16)
ORDERS = (TokenOrder.HWF, TokenOrder.WHF, TokenOrder.FHW, TokenOrder.HFW)
#: variant -> (per-head precisions, per-head orders?); None: no plan
VARIANTS = {
    "dense": None,
    "1g": ((Quant.NONE,) * 4, False),
    "1g_perm": ((Quant.NONE,) * 4, True),
    "2g_perm": ((Quant.NONE, Quant.NONE, Quant.INT8, Quant.INT8), True),
    "3g_perm": ((Quant.NONE, Quant.INT8, Quant.FP8, Quant.FP8), True),
    "4g_perm": ((Quant.NONE, Quant.INT8, Quant.FP8, Quant.INT8_FP8), True),
}
vs = torch.ops.vsopt


class Attention(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).unbind(2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.out(o.transpose(1, 2).reshape(B, N, C))


class Blocks(torch.nn.Module):
    """S attention blocks; each block's attention is one site (blocks.<i>)."""

    def __init__(self, sites: int, dim: int = HEADS * HEAD_DIM, heads: int = HEADS):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Attention(dim, heads) for _ in range(sites)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def heads_of(variant: str, block: int = 64) -> list[HeadPlan] | None:
    spec = VARIANTS[variant]
    if spec is None:
        return None
    quants, permuted = spec
    return [HeadPlan(Sparsity.PATTERN, ORDERS[h] if permuted else TokenOrder.FHW, quants[h], block, block,
                     pattern=LocalWindow(1, 2, 2)) for h in range(HEADS)]


def plan_of(variant: str, sites, block: int = 64) -> Plan | None:
    heads = heads_of(variant, block)
    return None if heads is None else Plan({s.site_id: SitePlan.for_site(s, heads) for s in sites})


def model_sites(model, x, grid):
    import vsopt

    report = vsopt.inspect(model, x, options={"grid": grid})
    return [s for s in report.sites if s.q_len == s.kv_len]


# ----------------------------------------------------------------------------- CPU: counts and host work


def _site_nodes(gm, site_id):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("vsopt_site") == site_id]


VIEWS = {"view", "_unsafe_view", "expand", "unsqueeze", "squeeze", "permute", "transpose", "t", "select", "slice",
         "alias", "getitem", "detach", "as_strided", "reshape", "unbind", "split"}


def _name(target) -> str:
    if target is getattr(__import__("operator"), "getitem"):
        return "getitem"
    return str(getattr(target, "__name__", target)).split(".")[0]


def graph_counts(gm, site_id) -> dict:
    """Per-site counts in the graph Inductor receives: vsopt ops (each a Python call at run time),
    block-sparse launches, ATen compute ops (views and getitem left out)."""
    nodes = _site_nodes(gm, site_id)
    ns = [getattr(n.target, "namespace", None) for n in nodes]
    return {"vsopt_ops": sum(1 for x in ns if x == "vsopt"),
            "launches": sum(1 for n in nodes if n.target is vs.block_sparse_attention.default),
            "aten_compute_ops": sum(1 for n, x in zip(nodes, ns) if x == "aten" and _name(n.target) not in VIEWS),
            "ops": sorted(str(n.target) for n in nodes)}


def inductor_view_counts(gm, inputs) -> dict:
    """The graph traced as Inductor traces it (AOTAutograd, functionalized: the triton_op bodies
    opened) on a fake CUDA device: Triton kernel launches, opaque custom ops, ATen compute ops, for
    the whole graph (constants become fake CUDA tensors: values do not matter to the counts)."""
    from functorch.compile import aot_function, make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensorMode

    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    state = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    names = list(state)
    with mode:   # every tensor a fake CUDA input (lifted, as AOTAutograd lifts a module's state)
        fake_state = [torch.zeros(t.shape, dtype=torch.bfloat16 if t.is_floating_point() else t.dtype, device="cuda")
                      for t in state.values()]
        fake_inputs = [torch.empty(x.shape, dtype=torch.bfloat16, device="cuda") for x in inputs]
    graphs = []

    def capture(g, _):
        graphs.append(g)
        return make_boxed_func(g.forward)

    def call(*args):
        xs, st = args[:len(fake_inputs)], args[len(fake_inputs):]
        return torch.func.functional_call(gm, dict(zip(names, st)), tuple(xs))

    with mode, torch.no_grad():
        aot_function(call, fw_compiler=capture)(*fake_inputs, *fake_state)
    g = graphs[0]
    targets = [n.target for n in g.graph.nodes if n.op == "call_function"]
    hop = torch.ops.higher_order.triton_kernel_wrapper_functional
    return {"triton_launches": sum(1 for t in targets if t is hop),
            "custom_ops": sum(1 for t in targets if getattr(t, "namespace", None) == "vsopt"),
            "aten_compute_ops": sum(1 for t in targets if getattr(t, "namespace", None) == "aten"
                                    and _name(t) not in VIEWS)}


@contextlib.contextmanager
def noop_kernels():
    """block_sparse_attention(_lse) without their kernels: empty outputs of the right shapes."""
    from vsopt.core import ops

    saved = ops._run_block_sparse

    def noop(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, quant, with_lse, softcap, row_order=None):
        ops._bsa_inputs.check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, quant, softcap)
        return torch.empty_like(q), (q.new_empty(q.shape[:3], dtype=torch.float32) if with_lse else None)

    ops._run_block_sparse = noop
    try:
        yield
    finally:
        ops._run_block_sparse = saved


def _call_us(fn, calls: int = 20, reps: int = 15) -> float:
    """The fastest of `reps` runs of `calls` calls, per call: the machine is shared, the minimum is
    the work itself."""
    return pipelined_us(fn, calls, reps, best=True)


def python_calls(fn) -> int:
    """Python function calls of one fn() call (cProfile's count, after a warm-up call): the
    Python work behind the ops, deterministic where a timing on a shared machine is not."""
    import cProfile
    import pstats

    fn()
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    return pstats.Stats(prof).total_calls


class _OpCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Ops dispatched at the top level of one call (a custom op counts once, its body not)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn) -> int:
    fn()
    with _OpCount() as c:
        fn()
    return c.n


def run_cpu(args) -> dict:
    from vsopt import inductor
    from vsopt.backend import trace_and_rewrite
    from vsopt.core.config import VsoptConfig

    torch.manual_seed(0)
    grid = tuple(args.cpu_grid)
    n = grid[0] * grid[1] * grid[2]
    model = Blocks(args.sites).eval()
    x = torch.randn(BATCH, n, HEADS * HEAD_DIM)
    sites = model_sites(model, x, grid)
    out = {"grid": grid, "tokens": n, "sites": len(sites), "variants": {}}
    dense_gm, _ = trace_and_rewrite(model, (x,), VsoptConfig.from_options({"grid": grid}))
    torch.set_num_threads(1)
    with torch.no_grad():
        dense_us = _call_us(lambda: dense_gm(x))
        dense_calls, dense_ops = python_calls(lambda: dense_gm(x)), dispatched_ops(lambda: dense_gm(x))
    for variant in VARIANTS:
        if variant == "dense":
            continue
        heads = heads_of(variant, args.cpu_block)
        plan = plan_of(variant, sites, args.cpu_block)
        rec = {"launch_groups": len(launch_groups(heads)), "permuted": reorders(heads)}
        for inline in (False, True):
            gm, _ = trace_and_rewrite(model, (x,), VsoptConfig.from_options({"grid": grid, "plan": plan}))
            if inline:
                inductor.prepare(gm)
            tag = "inlined" if inline else "ops"
            rec[f"graph_{tag}"] = {k: v for k, v in graph_counts(gm, sites[0].site_id).items()}
            with noop_kernels(), torch.no_grad():
                call = lambda: gm(x)  # noqa: E731
                rec[f"python_calls_per_site_{tag}"] = (python_calls(call) - dense_calls) / len(sites)
                rec[f"dispatched_ops_per_site_{tag}"] = (dispatched_ops(call) - dense_ops) / len(sites)
                rec[f"host_us_per_site_{tag}"] = round((_call_us(call) - dense_us) / len(sites), 1)
            if args.fake_cuda:
                c = inductor_view_counts(gm, (x,))
                rec[f"inductor_view_{tag}_per_site"] = {k: v / len(sites) for k, v in c.items()}
        out["variants"][variant] = rec
        print(f"{variant}: groups {rec['launch_groups']}, permuted {rec['permuted']}; per site over dense, "
              f"custom-op permutations -> inlined: Python calls {rec['python_calls_per_site_ops']} -> "
              f"{rec['python_calls_per_site_inlined']}, dispatched ops {rec['dispatched_ops_per_site_ops']} -> "
              f"{rec['dispatched_ops_per_site_inlined']}, host us (no-op kernels, CPU, noisy) "
              f"{rec['host_us_per_site_ops']} -> {rec['host_us_per_site_inlined']}; "
              + (f"Inductor view per site {rec.get('inductor_view_ops_per_site')} -> "
                 f"{rec.get('inductor_view_inlined_per_site')}" if args.fake_cuda else ""), flush=True)
    out["dense_call_us"] = round(dense_us, 1)
    return out


# ----------------------------------------------------------------------------- GPU: compiled models


def _gpu_us(fn) -> float | None:
    """GPU microseconds of one fn() call: fn captured in a CUDA graph, replayed between events."""
    try:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        out = []
        for _ in range(5):
            start.record()
            for _ in range(20):
                g.replay()
            end.record()
            torch.cuda.synchronize()
            out.append(1e3 * start.elapsed_time(end) / 20)
        return statistics.median(out)
    except Exception as e:  # noqa: BLE001 - not capturable: say so, the overhead is then not derived
        print(f"  (no CUDA-graph capture: {type(e).__name__}: {str(e)[:100]})", flush=True)
        torch.cuda.synchronize()
        return None


def _wall_us(fn, calls: int = 50, reps: int = 3, sync=None) -> float:
    return pipelined_us(fn, calls, reps, sync or torch.cuda.synchronize)


GPU_ORDER = [("dense", "eager", True), ("1g_perm", "eager", True), ("3g_perm", "eager", True),
             ("dense", "cudagraphs", True), ("1g_perm", "cudagraphs", True), ("3g_perm", "cudagraphs", True),
             ("1g_perm", "eager", False), ("dense", "eager", False), ("1g", "eager", True), ("2g_perm", "eager", True), ("4g_perm", "eager", True),
             ("1g", "cudagraphs", True)]


def run_gpu(args) -> dict:
    """The compiled runs (GPU_ORDER). --dry-run: the same flow on the CPU at a tiny grid, eager
    mode only, 'GPU time' = wall time (checks the script, not a measurement)."""
    from vsopt import inductor

    torch.manual_seed(0)
    dry = args.dry_run
    grid, block = ((1, 2, 8), 16) if dry else (GRID, 64)
    dev, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    sync = (lambda: None) if dry else torch.cuda.synchronize
    n = grid[0] * grid[1] * grid[2]
    model = Blocks(args.sites).to(dev, dtype).eval()
    x = torch.randn(BATCH, n, HEADS * HEAD_DIM, device=dev, dtype=dtype)
    sites = model_sites(model, x, grid)
    start = time.time()
    runs = []
    order = [r for r in GPU_ORDER if r[1] == "eager"][:4] if dry else GPU_ORDER
    for variant, mode, inline in order:
        if time.time() - start > args.budget_s:
            runs.append({"variant": variant, "mode": mode, "inlined": inline, "skipped": "time budget"})
            continue
        torch._dynamo.reset()
        inductor.INLINE_PERMUTATIONS = inductor.STATIC_WORK_ORDERS = inline
        options = {"grid": grid, "cudagraphs": mode == "cudagraphs"}
        plan = plan_of(variant, sites, block)
        if plan is not None:
            options["plan"] = plan
        t0 = time.time()
        compiled = torch.compile(model, backend="vsopt", options=options)
        with torch.no_grad():
            for _ in range(3):
                y = compiled(x)
            sync()
            compile_s = time.time() - t0
            call = lambda: compiled(x)  # noqa: E731
            wall = _wall_us(call, sync=sync)
            gpu = (wall if dry else _gpu_us(call)) if mode == "eager" else None
        heads = heads_of(variant)
        r = {"variant": variant, "mode": mode, "inlined": inline, "wall_us": wall, "gpu_us": gpu,
             "compile_s": round(compile_s, 1), "finite": bool(torch.isfinite(y).all()),
             "launch_groups": len(launch_groups(heads)) if heads else 0,
             "permuted": bool(heads and reorders(heads))}
        runs.append(r)
        print(f"{variant} {mode} inline={inline}: wall {wall:.1f} us, gpu {gpu}, compile {compile_s:.1f} s",
              flush=True)
    inductor.INLINE_PERMUTATIONS = inductor.STATIC_WORK_ORDERS = True
    return {"gpu": "cpu (dry run)" if dry else torch.cuda.get_device_name(), "torch": torch.__version__,
            "dry_run": dry, "sites": len(sites), "tokens": n,
            "batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "runs": runs, "seconds": round(time.time() - start, 1),
            "overhead_us": fit_overhead(runs, len(sites))}


def fit_overhead(runs: list[dict], sites: int) -> dict:
    """Per-site overhead terms from the runs: eager, (wall - gpu) over dense's per site; under CUDA
    graphs, wall over dense's per site minus the eager GPU difference. base: one launch group,
    unpermuted; per_launch: each further group (slope over the permuted variants); permuted: the
    permutations' extra (1g_perm - 1g)."""
    done = {(r["variant"], r["mode"], r["inlined"]): r for r in runs if "skipped" not in r}
    # the dense baseline: the dense model without vsopt.inductor.prepare where measured (what a
    # site left dense runs: prepare changes nothing in a dense graph now; a run of 21:11 UTC on
    # 2026-12-01 had dense sites written as ATen SDPA when prepared, 47 us/site slower, since removed)
    for mode in ("eager", "cudagraphs"):
        if (("dense", mode, False)) in done:
            done[("dense", mode, True)] = done[("dense", mode, False)]
    d_eager = done.get(("dense", "eager", True))
    gpu_of = {v: r["gpu_us"] for (v, m, i), r in done.items() if m == "eager" and i and r["gpu_us"] is not None}
    out = {}
    for mode in ("eager", "cudagraphs"):
        dense = done.get(("dense", mode, True))
        if dense is None or d_eager is None or d_eager["gpu_us"] is None:
            continue
        per = {}
        for (v, m, i), r in done.items():
            if m != mode or not i or v == "dense" or v not in gpu_of:
                continue
            extra_gpu = gpu_of[v] - d_eager["gpu_us"]
            per[v] = ((r["wall_us"] - dense["wall_us"]) - extra_gpu) / sites
        perm = {VARIANTS[v] and len(launch_groups(heads_of(v))): us for v, us in per.items() if v.endswith("_perm")}
        if len(perm) >= 2:
            xs, ys = zip(*sorted(perm.items()))
            mx, my = statistics.mean(xs), statistics.mean(ys)
            slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
            at1 = my + slope * (1 - mx)
        elif perm:
            slope, at1 = None, perm.get(1)
        else:
            continue
        base = per.get("1g", at1)
        out[mode] = {"per_site_by_variant": {v: round(us, 1) for v, us in per.items()},
                     "base": round(max(0.0, base), 1) if base is not None else None,
                     "per_launch": round(max(0.0, slope), 1) if slope is not None else None,
                     "permuted": round(max(0.0, at1 - base), 1) if at1 is not None and base is not None else None}
    noinline = done.get(("1g_perm", "eager", False))
    if noinline is not None and d_eager is not None and noinline.get("gpu_us") is not None:
        out["eager_before_inlining_1g_perm"] = round(((noinline["wall_us"] - d_eager["wall_us"])
                                                      - (noinline["gpu_us"] - d_eager["gpu_us"])) / sites, 1)
    return out


def apply(result_path: str, model_path: str) -> None:
    """Write a --gpu result's fitted overhead terms into a cost-model JSON (its overhead_us)."""
    from vsopt.core.costmodel import CostModel

    with open(result_path) as f:
        res = json.load(f)
    if res.get("dry_run"):
        raise SystemExit(f"{result_path}: a --dry-run on the CPU: its times are not a GPU's")
    model = CostModel.load(model_path)
    terms = fit_overhead(res["runs"], res["sites"]) if "runs" in res else res["overhead_us"]   # the fit of today
    for mode in ("eager", "cudagraphs"):
        t = terms.get(mode)
        if not t or t.get("base") is None:
            continue
        model.overhead_us[mode] = t["base"]
        for part in ("per_launch", "permuted"):
            if t.get(part) is not None:
                model.overhead_us[f"{mode}_{part}"] = t[part]
    model.meta["overhead_measured"] = {"source": "benchmarks/host_overhead.py --gpu", "gpu": res.get("gpu"),
                                       "torch": res.get("torch"), "sites": res.get("sites"),
                                       "tokens": res.get("tokens"), "terms": terms}
    model.save(model_path)
    print(f"{model_path}: overhead_us = {model.overhead_us}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu", action="store_true", help="counts and host work on this CPU (no GPU)")
    mode.add_argument("--gpu", action="store_true", help="compiled per-site overhead on the GPU")
    mode.add_argument("--apply", metavar="RESULT", help="write a --gpu result's overhead terms into --to")
    p.add_argument("--to", help="the cost-model JSON --apply updates")
    p.add_argument("--dry-run", action="store_true", help="--gpu: the flow on the CPU (a check, not a measurement)")
    p.add_argument("--out", help="the JSON to write")
    p.add_argument("--sites", type=int, default=4, help="attention blocks in the model")
    p.add_argument("--budget-s", type=float, default=170.0, help="--gpu: start no new variant after this")
    p.add_argument("--cpu-grid", type=int, nargs=3, default=(1, 2, 8), help="--cpu: the grid (tiny: host-bound)")
    p.add_argument("--cpu-block", type=int, default=16, help="--cpu: the table block")
    p.add_argument("--no-fake-cuda", dest="fake_cuda", action="store_false",
                   help="--cpu: skip the count on a fake CUDA device")
    args = p.parse_args(argv)
    if args.apply:
        if not args.to:
            p.error("--apply needs --to COSTMODEL.json")
        apply(args.apply, args.to)
        return 0
    if args.gpu and not args.dry_run and not torch.cuda.is_available():
        print("host_overhead --gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    result = run_cpu(args) if args.cpu else run_gpu(args)
    result["command"] = "python3 " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    text = json.dumps(result, indent=1)
    if args.out:
        atomic_write_text(args.out, text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
