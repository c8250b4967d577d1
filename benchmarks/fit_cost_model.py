"""Fit vsopt's cost model (vsopt/core/costmodel.py) to kernel timings measured on this GPU.

    python3 benchmarks/fit_cost_model.py --out vsopt/costmodels/h100.json \
        --raw benchmarks/results/cost_model_h100.json

Times, with triton.testing.do_bench (median, L2 flushed), on random bf16 inputs (B=1):
- torch.ops.vsopt.block_sparse_attention for each precision x head_dim x block size, at several
  sequence lengths and densities (a banded mask: each query block keeps the key blocks nearest the
  diagonal, so the visited blocks are realistic neighbours, and the count is exact);
- the token permutation the lowering places around a reordered site (permute q, k, v; unpermute
  the output), at several sizes;
- the dynamic mask (vsopt.dynamic_block_mask then mask_to_table) at several sizes.
Times are GPU times, replayed from CUDA graphs: the host's per-call overhead is measured for one
small call per kernel configuration and saved in meta, but not modelled (in a model it overlaps
with earlier GPU work unless the GPU starves).
The model is fitted on densities 0.1, 0.3 and 1.0 and checked on 0.2 and 0.5, which it has not seen:
the check's relative errors are printed and saved with the model (meta.check_*).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import vsopt.core  # noqa: E402,F401  (registers the ops)
import vsopt.core.dynamic  # noqa: E402,F401  (registers vsopt::dynamic_block_mask)
from vsopt.core.costmodel import CostModel, Launch, SiteWork, describe_environment
from vsopt.core.io import atomic_write_text  # noqa: E402

HOST: dict[str, float] = {}  # eager minus graph-replayed time of a small call, per kernel config
FIT_DENSITIES = (0.1, 0.3, 1.0)
CHECK_DENSITIES = (0.2, 0.5)
DEVICE = "cuda"


def banded_mask(heads: int, qb: int, kb: int, density: float, device) -> torch.Tensor:
    """(1, heads, qb, kb) bool: each row keeps the ceil(density * kb) key blocks nearest its diagonal."""
    keep = max(1, math.ceil(density * kb))
    i = torch.arange(qb, device=device)[:, None].float() * kb / qb
    j = torch.arange(kb, device=device)[None, :].float()
    rank = (j - i).abs().argsort(dim=1).argsort(dim=1)
    return (rank < keep)[None, None].expand(1, heads, qb, kb).contiguous()


TIMERS: dict[str, int] = {}


def bench(fn) -> float:
    """Median GPU microseconds of fn(), replayed from a CUDA graph so that the host's per-call
    overhead (Python, launch checks) is not counted: on a busy GPU it overlaps with earlier work.
    Falls back to eager timing (counted in TIMERS) for what cannot be captured."""
    import triton.testing

    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    try:
        t = triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")
        TIMERS["cudagraph"] = TIMERS.get("cudagraph", 0) + 1
    except Exception as e:  # noqa: BLE001 - not capturable: time it eagerly and say so
        TIMERS[f"eager ({type(e).__name__})"] = TIMERS.get(f"eager ({type(e).__name__})", 0) + 1
        t = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    return 1e3 * t


def eager_us(fn) -> float:
    """Median microseconds of fn() called eagerly (host overhead included)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def time_attention(quant: str, head_dim: int, block: int, n: int, heads: int, density: float) -> tuple[SiteWork, float]:
    dev = DEVICE
    q, k, v = (torch.randn(1, heads, n, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(3))
    qb = kb = math.ceil(n / block)
    mask = banded_mask(heads, qb, kb, density, dev)
    idx, counts = torch.ops.vsopt.mask_to_table(mask)
    scale = head_dim ** -0.5
    run = lambda: torch.ops.vsopt.block_sparse_attention(q, k, v, idx, counts, scale, block, block, quant)  # noqa: E731
    t = bench(run)
    if n <= 1024:  # host overhead of one call, for the record (not part of the model)
        HOST[f"{quant}/d{head_dim}/{block}x{block}"] = eager_us(run) - t
    work = SiteWork((Launch(quant, head_dim, block, block, heads * qb, int(mask.sum())),))
    return work, t


def time_permutation(n: int, heads: int, head_dim: int) -> tuple[SiteWork, float]:
    dev = DEVICE
    x = [torch.randn(1, heads, n, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(4)]
    perm = torch.stack([torch.randperm(n, device=dev) for _ in range(heads)])

    def run():
        for t in x[:3]:
            torch.ops.vsopt.permute_tokens(t, perm)
        torch.ops.vsopt.unpermute_tokens(x[3], perm)

    mib = 4 * x[0].numel() * x[0].element_size() / 2**20
    return SiteWork((), permuted_mib=mib), bench(run)


def time_dynamic(n: int, heads: int, head_dim: int, block: int) -> tuple[SiteWork, float]:
    dev = DEVICE
    q, k = (torch.randn(1, heads, n, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(2))

    def run():
        m = torch.ops.vsopt.dynamic_block_mask(q, k, head_dim ** -0.5, block, block, "cumulative_mass", 0.9, 0, "")
        torch.ops.vsopt.mask_to_table(m)

    nb = math.ceil(n / block)
    return SiteWork((), scored_blocks=heads * nb * nb), bench(run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="cost-model JSON to write")
    p.add_argument("--raw", default=None, help="also write every measurement here (JSON)")
    p.add_argument("--quants", default="none,int8,fp8,int8_fp8")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--blocks", default="64,128")
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--heads", type=int, default=8)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fit_cost_model: needs a CUDA GPU", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    lengths = [int(x) for x in args.lengths.split(",")]
    fit, check, raw = [], [], []

    def record(kind, work, t, held_out, **info):
        (check if held_out else fit).append((work, t))
        raw.append({"kind": kind, "us": t, "held_out": held_out, "features": CostModel.features(work), **info})

    for quant in args.quants.split(","):
        for d in (int(x) for x in args.head_dims.split(",")):
            for block in (int(x) for x in args.blocks.split(",")):
                for n in lengths:
                    for density in FIT_DENSITIES + CHECK_DENSITIES:
                        if n == lengths[0] and density not in (1.0,):
                            continue  # short sequences pin the fixed cost; one density is enough
                        work, t = time_attention(quant, d, block, n, args.heads, density)
                        record("attention", work, t, density in CHECK_DENSITIES, quant=quant, head_dim=d,
                               block=block, n=n, density=density)
                print(f"timed {quant} d{d} {block}x{block}", flush=True)
    for i, n in enumerate(lengths + [lengths[-1] * 2]):
        work, t = time_permutation(n, args.heads, 128)
        record("permute", work, t, i == 1, n=n)
        work, t = time_dynamic(n, args.heads, 128, 128)
        record("dynamic", work, t, i == 1, n=n)
    model = CostModel.fit(fit, gpu, meta={**describe_environment(), "source": "benchmarks/fit_cost_model.py",
                                          "heads": args.heads, "lengths": lengths})
    rel = [abs(model.predict_us(w) - t) / t for w, t in check]
    model.meta["timers"] = TIMERS
    model.meta["host_overhead_us_not_in_model"] = {k: round(v, 1) for k, v in sorted(HOST.items())}
    model.meta["check_measurements"] = len(check)
    model.meta["check_median_rel_error"] = sorted(rel)[len(rel) // 2] if rel else None
    model.meta["check_max_rel_error"] = max(rel) if rel else None
    model.save(args.out)
    if args.raw:
        atomic_write_text(args.raw, json.dumps({"gpu": gpu, **describe_environment(), "measurements": raw}, indent=1))
    print(f"{gpu}: fitted on {len(fit)} timings (median rel error {model.meta['fit_median_rel_error']:.3f}, "
          f"max {model.meta['fit_max_rel_error']:.3f}); held-out check on {len(check)}: median "
          f"{model.meta['check_median_rel_error']:.3f}, max {model.meta['check_max_rel_error']:.3f}")
    print(json.dumps(model.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
