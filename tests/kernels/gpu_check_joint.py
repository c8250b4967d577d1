"""GPU check of split joint attention (vsopt.core.joint through semantics.site_output(mask=...)):
HunyuanVideo-like sites, video tokens then padded text with a key-padding mask, the video x video
part through the Triton kernel with its log-sum-exp, the text dense, merged by LSE.

    python3 tests/kernels/gpu_check_joint.py          (one CUDA GPU, bf16; exit status 1 if a check fails)
    python3 tests/kernels/gpu_check_joint.py --smoke  (tiny sizes on the CPU: the references)

Each JSON line: case, text length / valid tokens, relative L2 of the split result (a plan keeping
every block, in a token order) against float32 SDPA with the mask (bound: bf16 rounding), the same
for a sparse plan against the float32 split reference on the same inputs, and the times of the
split and of SDPA with the mask. Not collected by pytest (tests/core/test_joint.py checks the same
on the CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from vsopt.core.ir import AttentionSite, Layout, TokenGrid
from vsopt.core.patterns import Dense, LocalWindow
from vsopt.core.plan import HeadPlan, Quant
from vsopt.core.semantics import site_output

BOUND = {"none": 2e-2, "int8": 6e-2}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.smoke else torch.bfloat16
    grids = [TokenGrid(2, 4, 4, text_after=9)] if args.smoke else [TokenGrid(16, 30, 52, text_after=256),
                                                                      TokenGrid(9, 17, 31, text_after=77)]
    heads, d = (2, 64) if args.smoke else (8, 128)
    failed = 0
    for grid in grids:
        n = grid.num_tokens
        site = AttentionSite("check.attn", 0, "sdpa", Layout.BHND, 1, heads, heads, d, d, n, n, dtype, d ** -0.5,
                             has_mask=True, grid=grid)
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=dtype, generator=g) for _ in range(3))
        for valid in (grid.text_after, grid.text_after // 3):
            mask = torch.ones(1, 1, 1, n, dtype=torch.bool, device=device)
            mask[..., grid.text_before + grid.video_tokens + valid:] = False
            for quant in (Quant.NONE, Quant.INT8):
                keep = [HeadPlan(sparsity="pattern", pattern=Dense(), order="hwf", quant=quant, block_m=64, block_n=64)] * heads
                t0 = time.perf_counter()
                got = site_output(site, keep, q, k, v, site.scale, mask=mask)
                sync(device)
                t_split = time.perf_counter() - t0
                t0 = time.perf_counter()
                want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=site.scale)
                sync(device)
                t_sdpa = time.perf_counter() - t0
                err = float((got - want).norm() / want.norm())
                sparse = [HeadPlan(sparsity="pattern", pattern=LocalWindow(1, 4, 4), quant=quant, block_m=64, block_n=64)] * heads
                sp = site_output(site, sparse, q, k, v, site.scale, mask=mask)
                ref = site_output(site, [HeadPlan(sparsity="pattern", pattern=LocalWindow(1, 4, 4), block_m=64,
                                                  block_n=64)] * heads, q.float(), k.float(), v.float(), site.scale, mask=mask)
                sp_err = float((sp - ref).norm() / ref.norm())
                ok = err <= BOUND[quant.value] and sp_err <= BOUND[quant.value]
                failed += not ok
                print(json.dumps({"grid": str(grid), "valid": valid, "quant": quant.value, "keep_all_vs_sdpa": err,
                                  "sparse_vs_f32_reference": sp_err, "split_s": t_split, "sdpa_f32_s": t_sdpa,
                                  "pass": ok}))
    return 1 if failed else 0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
