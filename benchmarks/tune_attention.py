"""Tuning sweep of the block-sparse attention kernel on the GPU: every kernel configuration (tile,
warps, pipeline stages, pointer or TMA loads) for each quantization mode, on
the reference workloads, at a sparse and a dense mask. Picks what goes into the autotuner's pruned
list (kernels/block_sparse/launch.py) and shows what each choice is worth.

    python3 benchmarks/tune_attention.py --workloads wan480,cog720 --out results/tune.json

Every configuration's output is checked against the first configuration of its mode (the same
math, another schedule: relative L2 < 1e-2, else it is reported as wrong and not ranked). Times are
GPU times (median of CUDA-graph replays) of the attention kernel alone, on pre-quantized inputs;
the quantization kernels are timed separately per mode. Stops cleanly after --budget-s seconds.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import BLOCK, WORKLOADS, _bench, _atomic_write, window_block_mask  # noqa: E402

# (block_m, block_n, num_warps, num_stages) per head_dim, tried with each load path.
TILES = {
    128: [(128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 4)],
    64: [(128, 128, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3)],
}
VARIANTS = {"ptr": dict(use_tma=False), "tma": dict(use_tma=True)}


def sweep(w, modes, densities, rep_ms: float, deadline: float, log) -> list[dict]:
    from vsopt.kernels.block_mask import launch as mask_launch
    from vsopt.kernels.block_sparse import kernel, launch
    from vsopt.kernels.quant import launch as quant_launch

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, w.heads, w.n, w.head_dim)
    q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    tables = {}
    for d in densities:
        mask = window_block_mask(w, d, BLOCK, "cuda")
        tables[d] = (*mask_launch.mask_to_table(mask), float(mask.float().mean()))
    scale = w.head_dim ** -0.5
    rows = []
    for mode in modes:
        if mode != "none":
            quant_ms = _bench(lambda: quant_launch.quantize_qkv(q, k, v, mode, BLOCK, BLOCK), rep_ms)
            qq = quant_launch.quantize_qkv(q, k, v, mode, BLOCK, BLOCK)
            rows.append({"workload": w.name, "mode": mode, "what": "quantization", "ms": quant_ms})
            log(f"{w.name} {mode}: quantization {quant_ms:.3f} ms")
        else:
            qq = None
        first = {}
        for tile in TILES[w.head_dim]:
            for path, flags in VARIANTS.items():
                if time.monotonic() > deadline:
                    log("time budget reached: stopping the sweep")
                    return rows
                cfg = launch.Tile(*tile, **flags)
                for d, (idx, cnt, density) in tables.items():
                    row = {"workload": w.name, "mode": mode, "density": density, "tile": list(tile), "path": path}
                    try:
                        fn = _kernel_call(kernel, launch, q, k, v, qq, idx, cnt, scale, mode, cfg)
                        out = fn()
                        torch.cuda.synchronize()
                        ref = first.setdefault(d, out)
                        err = float((out.float() - ref.float()).norm() / ref.float().norm())
                        row["rel_l2_vs_first"] = err
                        row["ok"] = err < 1e-2
                        row["ms"] = _bench(fn, rep_ms)
                        flops = 4 * w.heads * w.n * w.n * w.head_dim * density
                        row["tflops"] = flops / row["ms"] / 1e9
                    except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a result
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    rows.append(row)
                    log(f"{w.name} {mode:9s} d={density:.3f} {str(tile):20s} {path:7s} "
                        + (f"{row['ms']:7.3f} ms {row['tflops']:5.0f} TFLOP/s err {row['rel_l2_vs_first']:.1e}"
                           if "ms" in row else row.get("error", "")))
    return rows


def _kernel_call(kernel, launch, q, k, v, qq, idx, cnt, scale, mode, cfg, order="per_head_lpt"):
    """A closure launching the kernel once with configuration cfg on (pre-quantized) inputs."""
    import math

    from vsopt.kernels.spec import KernelSpec

    B, H, N, D = q.shape
    spec = KernelSpec(D, torch.bfloat16, mode, BLOCK, BLOCK)
    qs = ks = vs = None
    if qq is not None:
        q, k, v, qs, ks, vs = qq.q, qq.k, qq.v, qq.q_scale, qq.k_scale, qq.v_scale
    stride_vn, stride_vd = (1, v.stride(2)) if spec.quant.pv_is_8bit else (v.stride(2), 1)
    out = torch.empty((B, H, N, D), dtype=torch.bfloat16, device=q.device)
    order = launch.work_order(cnt, B, order)
    QB = KB = math.ceil(N / BLOCK)
    if cfg.use_tma:
        launch.ensure_tma_allocator()
    grid = (order.numel() * (BLOCK // cfg.block_m),)

    def call():
        kernel.block_sparse_fwd_kernel[grid](
            q, k, v, out, out, qs if qs is not None else order, ks if ks is not None else order,
            vs if vs is not None else order, idx, cnt, order,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), stride_vn, stride_vd, out.stride(0), out.stride(1), out.stride(2),
            0, idx.stride(1), idx.stride(2), 0, cnt.stride(1),
            H, 1, N, N, QB, KB, scale * 1.4426950408889634,
            **launch.spec_constexprs(spec), WRITE_LSE=False, EVEN_N=N % BLOCK == 0, ROUND_IN_FP32=False,
            **cfg.launch_args())
        return out
    return call


def quantization_parts(w, rep_ms: float, log) -> list[dict]:
    """Each quantization kernel alone, on contiguous (B, H, N, D) inputs and on the (B, N, H, D)
    views a transformer's projections give (what the compiled model passes)."""
    from vsopt.kernels.quant import launch as quant_launch

    rows = []
    for layout in ("bhnd", "bnhd"):
        g = torch.Generator(device="cuda").manual_seed(0)
        if layout == "bhnd":
            x = [torch.randn(1, w.heads, w.n, w.head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
                 for _ in range(3)]
        else:
            x = [torch.randn(1, w.n, w.heads, w.head_dim, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                 for _ in range(3)]
        q, k, v = x
        v_max = quant_launch.channel_stats(v)
        parts = {
            "channel_stats(v)": lambda: quant_launch.channel_stats(v),
            "quantize_blocks(q, int8)": lambda: quant_launch.quantize_blocks(q, BLOCK, "int8"),
            "quantize_blocks(q, fp8)": lambda: quant_launch.quantize_blocks(q, BLOCK, "fp8"),
            "quantize_k(k, int8)": lambda: quant_launch.quantize_k(k, BLOCK, "int8"),
        }
        for bn, warps in ((128, 4), (128, 8), (64, 4), (256, 4)):
            parts[f"quantize_v_fp8(v, block_n={bn}, warps={warps})"] = \
                lambda bn=bn, warps=warps: quant_launch.quantize_v_fp8(v, v_max, bn, warps)
        for name, fn in parts.items():
            ms = _bench(fn, rep_ms)
            bytes_moved = q.numel() * 2 * (2 if "stats(k, v)" in name else 1) + (0 if "stats" in name else q.numel())
            rows.append({"workload": w.name, "layout": layout, "what": name, "ms": ms,
                         "GB/s": bytes_moved / ms / 1e6})
            log(f"{w.name} {layout} {name:34s} {ms:.3f} ms  {bytes_moved / ms / 1e6:6.0f} GB/s")
    return rows


def site_check(rep_ms: float, log) -> list[dict]:
    """The e2e benchmark's self-attention site (Wan2.1 480p, LocalWindow(2, 15, 15) at 128x128
    blocks, (B, N, H, D) views) through torch.ops.vsopt.block_sparse_attention: the autotuner's
    choice and its time per mode."""
    from vsopt.core.ir import TokenGrid
    from vsopt.core.patterns import LocalWindow, block_mask
    from vsopt.kernels.block_mask import launch as mask_launch
    from vsopt.kernels.block_sparse import launch, route

    grid = TokenGrid(21, 30, 52)
    mask = block_mask(LocalWindow(2, 15, 15), grid, block_m=BLOCK, block_n=BLOCK).to("cuda")
    mask = mask.reshape(1, 1, *mask.shape[-2:]).expand(1, 12, -1, -1).contiguous()
    idx, cnt = mask_launch.mask_to_table(mask)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, grid.num_tokens, 12, 128, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    rows = []
    for mode in ("none", "int8", "fp8", "int8_fp8"):
        fn = lambda: torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, 128 ** -0.5, BLOCK, BLOCK, mode)  # noqa: E731
        with route.switched(False):   # the Triton kernel's tuning (bf16 would take the Gluon route)
            ms = _bench(fn, rep_ms)
        chosen = launch._tuned_kernel.best_config
        rows.append({"what": "e2e site via op", "mode": mode, "density": float(mask.float().mean()), "ms": ms,
                     "autotuned": str(chosen)})
        log(f"e2e site {mode:9s} density {float(mask.float().mean()):.3f}: {ms:.3f} ms (quantization included); "
            f"autotuner chose {chosen}")
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    with route.switched(False):
        ms = _bench(lambda: torch.ops.vsopt.block_sparse_attention(qc, kc, vc, idx, cnt, 128 ** -0.5, BLOCK, BLOCK,
                                                                   "none"), rep_ms)
    rows.append({"what": "e2e site via op, contiguous (B, H, N, D)", "mode": "none", "ms": ms})
    log(f"e2e site none on contiguous (B, H, N, D) inputs: {ms:.3f} ms")
    return rows


def order_study(rep_ms: float, log) -> list[dict]:
    """Work-order strategies on the e2e site's mask (rows of unequal counts), bf16 and FP8."""
    from vsopt.core.ir import TokenGrid
    from vsopt.core.patterns import LocalWindow, block_mask
    from vsopt.kernels.block_mask import launch as mask_launch
    from vsopt.kernels.block_sparse import kernel, launch
    from vsopt.kernels.quant import launch as quant_launch

    grid = TokenGrid(21, 30, 52)
    mask = block_mask(LocalWindow(2, 15, 15), grid, block_m=BLOCK, block_n=BLOCK).to("cuda")
    mask = mask.reshape(1, 1, *mask.shape[-2:]).expand(1, 12, -1, -1).contiguous()
    idx, cnt = mask_launch.mask_to_table(mask)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 12, grid.num_tokens, 128, generator=g, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    rows = []
    for mode, tile in (("none", launch.Tile(128, 128, 8, 3, True)), ("fp8", launch.Tile(128, 128, 4, 3, True))):
        qq = quant_launch.quantize_qkv(q, k, v, mode, BLOCK, BLOCK) if mode != "none" else None
        for strategy in launch.ORDERS:
            fn = _kernel_call(kernel, launch, q, k, v, qq, idx, cnt, 128 ** -0.5, mode, tile, strategy)
            ms = _bench(fn, rep_ms)
            rows.append({"what": "order study (e2e site mask)", "mode": mode, "order": strategy, "ms": ms,
                         "density": float(mask.float().mean())})
            log(f"order study {mode:5s} {strategy:13s} {ms:.3f} ms")
    return rows


def best(rows: list[dict]) -> list[dict]:
    """The fastest correct configuration per (workload, mode, density)."""
    top: dict[tuple, dict] = {}
    for r in rows:
        if r.get("ok") and "tile" in r:
            key = (r["workload"], r["mode"], round(r["density"], 3))
            if key not in top or r["ms"] < top[key]["ms"]:
                top[key] = r
    return list(top.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="wan480,cog720")
    ap.add_argument("--modes", default="none,int8,fp8,int8_fp8")
    ap.add_argument("--densities", default="0.2,1.0")
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--out", default="tune_attention.json")
    ap.add_argument("--parts", default="order,site,quant,tiles",
                    help="order: work-order strategies; site: the e2e site through the op; quant: the "
                         "quantization kernels; tiles: the configuration sweep")
    args = ap.parse_args(argv)
    import triton

    t0 = time.monotonic()
    log = lambda s: print(f"[{time.monotonic() - t0:6.1f}s] {s}", flush=True)  # noqa: E731
    import vsopt.core  # noqa: F401  (registers torch.ops.vsopt.*)

    parts = args.parts.split(",")
    rows = (order_study(args.rep_ms, log) if "order" in parts else []) + \
        (site_check(args.rep_ms, log) if "site" in parts else [])
    for name in args.workloads.split(",") if "quant" in parts else ():
        rows += quantization_parts(WORKLOADS[name], args.rep_ms, log)
    for name in args.workloads.split(",") if "tiles" in parts else ():
        rows += sweep(WORKLOADS[name], args.modes.split(","), [float(d) for d in args.densities.split(",")],
                      args.rep_ms, t0 + args.budget_s, log)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python3 benchmarks/tune_attention.py " + " ".join(argv or sys.argv[1:]),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rows": rows, "best": best(rows)}
    _atomic_write(args.out, json.dumps(result, indent=1))
    for r in result["best"]:
        log(f"BEST {r['workload']} {r['mode']:9s} d={r['density']:.3f} {r['tile']} {r['path']}: "
            f"{r['ms']:.3f} ms, {r['tflops']:.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
