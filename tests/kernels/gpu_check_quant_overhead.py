"""Where the quantized modes' quantization time goes, and what the fused forms save (issue 16 item 3:
quantization overhead < 5% of the attention at density 0.2). About 1-2 minutes on an H200.

    python3 tests/kernels/gpu_check_quant_overhead.py --out $OUT            (wan480, fp8 and int8_int8)
    python3 tests/kernels/gpu_check_quant_overhead.py --out $OUT --modes int8,fp8,int8_fp8,int8_int8 --no-sweep

(--budget-s, default 150: no new mode or layout starts after it; each new attention variant autotunes
4 tiles, the compiles are most of the run.)

For each quantized mode at wan480 (1, 12, 32760, 128), bf16, density 0.2 (a random block mask plus
the diagonal, 128x128 blocks), CUDA events, best of 3 rounds of the mean of --reps calls:
- bf16: the op in mode "none";
- kernel: the attention kernel alone on inputs quantized ahead (launch.launch_prepared);
- each quantization variant: "separate" (V's channel stats, Q, K, V: four launches in the 8-bit P V
  modes; Q and K in int8, whose K smoothing needs no statistics pass: the K launch averages 64 sampled
  rows itself), "fused_kv" (K and V in one launch, quant/launch.quantize_kv), "q_in_kernel" (no Q
  pass: the attention kernel quantizes Q in its prologue, kernel.py QUANT_Q), both, "q_with_stats" (Q
  quantized in V's channel statistics launch, quant/launch.stats_and_q; 8-bit P V only) and that with
  fused_kv: its quantize_qkv time, the op's time with
  the variant (launch.FUSE_KV_QUANT / QUANTIZE_Q_IN_KERNEL), and overhead = (op - kernel) / kernel,
  the kernel on fully pre-quantized inputs being the zero-overhead floor; the op's output against the
  separate variant's (the same codes: rel L2 ~0);
- each quantization kernel alone (ms and GB/s moved: reads + writes), and with --sweep (default) their
  launch parameters (programs' rows, num_warps) for the fastest setting;
- layouts: "contiguous" (B, H, N, D) and "model", the (B, N, H, D) projections seen as (B, H, N, D)
  (what a Wan block hands the op).
Writes quant_overhead.json under --out (rewritten after every mode). --device cpu with --shape runs
the same code under TRITON_INTERPRET=1 at a tiny size (wall-clock times: a check of the script only;
tests/kernels/test_gpu_check_quant_overhead.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import vsopt.core  # noqa: E402,F401  (registers torch.ops.vsopt.*)
from gpu_check import best_ms, random_mask  # noqa: E402
from vsopt.kernels.block_sparse import launch as bsa  # noqa: E402
from vsopt.kernels.quant import launch as ql  # noqa: E402
from vsopt.kernels.spec import QuantMode  # noqa: E402

MODES = ("int8", "fp8", "int8_fp8", "int8_int8")
DEFAULT_MODES = ("fp8", "int8_int8")   # the fastest mode and the accurate one
VARIANTS = {"separate": (False, False, False), "fused_kv": (True, False, False), "q_in_kernel": (False, True, False),
            "fused_kv+q_in_kernel": (True, True, False), "q_with_stats": (False, False, True),
            "q_with_stats+fused_kv": (True, False, True)}   # name -> (fuse_kv, q_in_kernel, q_with_stats)
TARGET = 0.05
DEVICE = "cuda"
REPS = 20


def ms(fn, reps=None) -> float:
    """gpu_check.best_ms on this script's DEVICE, REPS calls a round unless told."""
    return best_ms(fn, reps or REPS, DEVICE)


def inputs(H, N, D, layout):
    # bfloat16 on the GPU; float16 on the CPU, whose interpreter gets bfloat16 tl.dot wrong (and refuses it)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    if layout == "model":
        return [torch.randn(1, N, H, D, device=DEVICE, dtype=dtype).transpose(1, 2) for _ in range(3)]
    return [torch.randn(1, H, N, D, device=DEVICE, dtype=dtype) for _ in range(3)]


def attention(q, k, v, idx, cnt, mode):
    if DEVICE == "cuda":
        return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, q.shape[-1] ** -0.5, 128, 128, mode)
    return bsa.block_sparse_attention(q, k, v, idx, cnt, q.shape[-1] ** -0.5, 128, 128, mode)[0]


def with_variant(fuse_kv, q_in_kernel, q_with_stats, fn):
    saved = bsa.FUSE_KV_QUANT, bsa.QUANTIZE_Q_IN_KERNEL, bsa.FUSE_Q_WITH_STATS
    bsa.FUSE_KV_QUANT, bsa.QUANTIZE_Q_IN_KERNEL, bsa.FUSE_Q_WITH_STATS = fuse_kv, q_in_kernel, q_with_stats
    try:
        return fn()
    finally:
        bsa.FUSE_KV_QUANT, bsa.QUANTIZE_Q_IN_KERNEL, bsa.FUSE_Q_WITH_STATS = saved


def kernel_alone(q, k, v, idx, cnt, mode, quantized):
    """The attention kernel on `quantized` (codes made ahead): the op's launch without its quantization."""
    m = QuantMode.parse(mode)
    spec = bsa.kernel_spec(q, k, v, q.shape[-1] ** -0.5, 128, 128, m)
    out = torch.empty_like(q)
    return lambda: bsa.launch_prepared(spec, out, q, k, v, quantized, None, idx, cnt, q.shape[-1] ** -0.5,
                                       pv_format=m.pv_format)


def part_times(q, k, v, mode, sweep: bool) -> dict:
    """Each quantization kernel alone: ms and GB/s (bytes read + written); with sweep, launch settings."""
    m = QuantMode.parse(mode)
    fmt, pv = m.qk_format, m.pv_format
    elems = k.numel()
    gbps = lambda nbytes, t: nbytes / t / 1e6  # noqa: E731  (bytes per ms -> GB/s)
    out = {}
    if pv:   # V's channel abs-max: the only statistics pass left (K's smoothing mean is in K's launch)
        v_max = ql.channel_stats(v)
        t = ms(lambda: ql.channel_stats(v))
        out["channel_stats"] = {"ms": t, "gbps": gbps(elems * 2, t)}
    t = ms(lambda: ql.quantize_blocks(q, 128, fmt))
    out["quantize_q"] = {"ms": t, "gbps": gbps(elems * 3, t)}
    t = ms(lambda: ql.quantize_k(k, 128, fmt))
    out["quantize_k"] = {"ms": t, "gbps": gbps(elems * 3, t)}
    if pv:
        t = ms(lambda: ql.quantize_v_fp8(v, v_max, fmt=pv))
        out["quantize_v"] = {"ms": t, "gbps": gbps(elems * 3, t)}
        t = ms(lambda: ql.quantize_kv(k, v, v_max, 128, fmt, pv))
        out["quantize_kv"] = {"ms": t, "gbps": gbps(elems * 6, t)}
        t = ms(lambda: ql.stats_and_q(v, q, 128, fmt))
        out["stats_and_q"] = {"ms": t, "gbps": gbps(elems * 5, t)}
    if sweep:
        sw = {}
        for w in (4, 8, 16):
            sw[f"quantize_k warps {w}"] = ms(lambda: ql.quantize_k(k, 128, fmt, num_warps=w))
        if pv:
            for rows, tile in ((64, 64), (128, 64), (128, 128), (256, 64), (256, 128), (512, 128)):
                for w in (4, 8):
                    sw[f"channel_stats rows {rows} tile {tile} warps {w}"] = ms(lambda: ql.channel_stats(v, rows, w, tile))
            for rows, tile in ((128, 32), (256, 32), (256, 64), (512, 32), (512, 64), (1024, 32)):
                for w in (4, 8):
                    sw[f"channel_stats rows {rows} tile {tile} warps {w} deferred"] = ms(
                        lambda: ql.channel_stats(v, rows, w, tile, defer=True))
            for bn in (64, 128, 256):
                for w in (4, 8):
                    sw[f"quantize_v block_n {bn} warps {w}"] = ms(lambda: ql.quantize_v_fp8(v, v_max, bn, w, fmt=pv))
            for w in (4, 8, 16):
                sw[f"quantize_kv warps {w}"] = ms(lambda: ql.quantize_kv(k, v, v_max, 128, fmt, pv, num_warps=w))
        out["sweep_ms"] = sw
        best = {}
        for name, t in sw.items():
            kind = name.split(" ")[0]
            if kind not in best or t < best[kind][1]:
                best[kind] = (name, t)
        out["sweep_best"] = {kind: {"setting": n, "ms": t} for kind, (n, t) in best.items()}
    return out


def run(H, N, D, modes, layouts, sweep, out_dir, budget_s=float("inf")) -> dict:
    deadline = time.time() + budget_s
    nb = math.ceil(N / 128)
    torch.manual_seed(0)
    idx, cnt = torch.ops.vsopt.mask_to_table(random_mask(1, H, nb, nb, 0.2, DEVICE))
    result = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter: not a timing)",
              "torch": torch.__version__, "shape": [1, H, N, D], "density_run": float(cnt.sum()) / (H * nb * nb),
              "target_overhead": TARGET, "lines": [], "skipped": []}
    path = os.path.join(out_dir, "quant_overhead.json")
    for layout in layouts:
        q, k, v = inputs(H, N, D, layout)
        bf16_ms = ms(lambda: attention(q, k, v, idx, cnt, "none"))
        print(f"INFO {layout}: bf16 op {bf16_ms:.3f} ms", flush=True)
        for mode in modes:
            if time.time() > deadline:
                result["skipped"].append(f"{layout} {mode}: time budget")
                print(f"SKIP {layout} {mode}: time budget", flush=True)
                continue
            pv = QuantMode.parse(mode).pv_format
            line = {"layout": layout, "mode": mode, "bf16_ms": bf16_ms}
            ahead = ql.quantize_qkv(q, k, v, mode, 128, 128)
            kernel_ms = ms(kernel_alone(q, k, v, idx, cnt, mode, ahead))
            line["kernel_prequantized_ms"] = kernel_ms
            base = attention(q, k, v, idx, cnt, mode).float()
            line["variants"] = {}
            for name, (fuse_kv, q_in, q_st) in VARIANTS.items():
                if (fuse_kv or q_st) and not pv:
                    continue   # 16-bit P V: no V to quantize, nothing to fuse, no statistics launch
                qt = ms(lambda: ql.quantize_qkv(q, k, v, mode, 128, 128, fuse_kv=fuse_kv, q_in_kernel=q_in,
                                                q_with_stats=q_st))
                op = with_variant(fuse_kv, q_in, q_st, lambda: ms(lambda: attention(q, k, v, idx, cnt, mode)))
                got = with_variant(fuse_kv, q_in, q_st, lambda: attention(q, k, v, idx, cnt, mode)).float()
                rel = float((got - base).norm() / base.norm().clamp_min(1e-30))
                over = (op - kernel_ms) / kernel_ms
                line["variants"][name] = {"quantize_qkv_ms": qt, "op_ms": op, "overhead": over, "rel_l2_vs_separate": rel}
                print(f"{'MET ' if over < TARGET else 'MISS'} {layout} {mode:<9} {name:<21} op {op:.3f} ms, quantize_qkv "
                      f"{qt:.3f} ms, overhead {100 * over:5.1f}% of the pre-quantized kernel's {kernel_ms:.3f} ms "
                      f"(bf16 {bf16_ms:.3f}); vs separate rel_l2 {rel:.1e}", flush=True)
            if layout == layouts[0]:
                line["parts"] = part_times(q, k, v, mode, sweep and mode in ("fp8", "int8_int8"))
                print(f"INFO {layout} {mode} parts: " + ", ".join(
                    f"{n} {p['ms']:.3f} ms ({p['gbps']:.0f} GB/s)" for n, p in line["parts"].items() if "ms" in p),
                    flush=True)
                for kind, b in line["parts"].get("sweep_best", {}).items():
                    print(f"INFO {layout} {mode} sweep best {kind}: {b['setting']} {b['ms']:.3f} ms", flush=True)
            result["lines"].append(line)
            with open(path, "w") as f:
                json.dump(result, f, indent=1)
            del ahead, base
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


def main(argv=None) -> int:
    global DEVICE, REPS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--shape", default="12,32760,128", help="H,N,D (default wan480)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--budget-s", type=float, default=150.0, help="start no new mode or layout after this")
    p.add_argument("--layouts", default="contiguous,model")
    p.add_argument("--reps", type=int, default=REPS)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = p.parse_args(argv)
    DEVICE, REPS = args.device, args.reps
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_check_quant_overhead.py needs a CUDA GPU (or --device cpu under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts or any(x not in ("contiguous", "model") for x in layouts):
        p.error("--layouts: contiguous, model")
    H, N, D = (int(x) for x in args.shape.split(","))
    os.makedirs(args.out, exist_ok=True)
    run(H, N, D, modes, layouts, not args.no_sweep, args.out, args.budget_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
