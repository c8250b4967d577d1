"""GPU check of the ring merge: a site's plan split in R sequence shards on one GPU (vsopt.core.ring:
sub-tables per query shard x key piece through block_sparse_attention_lse, partials merged by
their log-sum-exp) against the unsplit kernel (semantics.site_output), at Wan sizes.

    python3 tests/kernels/gpu_check_ring.py          (one CUDA GPU; exit status 1 if any check fails)
    python3 tests/kernels/gpu_check_ring.py --smoke  (the same cases at tiny sizes on the CPU: references)

Each line: case, R, cosine and relative L2 of the concatenated shards against the unsplit result,
PASS/FAIL against the bound (bf16: each partial output is rounded to bf16 before the merge, so the
split result differs from the unsplit one by about the output rounding; quantized heads also
quantize each key piece with its own scales and smoothing mean), and the time of both.
Not collected by pytest (tests/core/test_ring.py checks the same on the CPU at tiny sizes).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from vsopt.core.dynamic import DynamicSpec
from vsopt.core.ir import AttentionSite, Layout, TokenGrid
from vsopt.core.patterns import LocalWindow, Radial, TemporalDiagonals
from vsopt.core.plan import HeadPlan
from vsopt.core.ring import EagerEmitter, Shards, ring_attention, shard_rows
from vsopt.core.semantics import site_output

BOUND = {"none": 1e-2, "quant": 5e-2}
failures: list[str] = []


DEVICE = "cuda"


def site_of(grid: TokenGrid, heads: int, head_dim: int = 128) -> AttentionSite:
    n = grid.num_tokens
    return AttentionSite("check.attn", 0, "sdpa", Layout.BHND, 1, heads, heads, head_dim, head_dim, n, n,
                         torch.bfloat16, head_dim ** -0.5, grid=grid)


def random_mask_heads(site, count, block, gen) -> list[HeadPlan]:
    qb = -(-site.q_len // block)
    heads = []
    for i in range(count):
        m = torch.rand(qb, qb, generator=gen) < (0.05 + 0.4 * i / max(1, count - 1))
        m |= torch.eye(qb, dtype=torch.bool)
        heads.append(HeadPlan(sparsity="mask", mask=m, block_m=block, block_n=block))
    return heads


def check(case: str, site: AttentionSite, heads: list[HeadPlan], degrees, bound: float,
          exact_heads: list[HeadPlan] | None = None) -> None:
    """PASS when the shards' result is within `bound` (relative L2) of the unsplit kernel's; with
    exact_heads (the same heads unquantized) when its error against that exact result is at most
    1.25x the unsplit kernel's own quantization error (+ `bound`/10)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, site.heads, site.q_len, site.head_dim, device=DEVICE, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    sync()
    t0 = time.perf_counter()
    want = site_output(site, heads, q, k, v, site.scale)
    sync()
    t_full = time.perf_counter() - t0
    exact = site_output(site, exact_heads, q, k, v, site.scale).float().flatten() if exact_heads else None
    em = EagerEmitter(DEVICE)
    for R in degrees:
        shards = Shards(site.q_len, R)
        ks = [shard_rows(k, shards, j) for j in range(R)]
        vs = [shard_rows(v, shards, j) for j in range(R)]
        sync()
        t0 = time.perf_counter()
        parts = [ring_attention(site, heads, r, shards, shard_rows(q, shards, r), ks, vs, site.scale, em, f"{case}/{r}")
                 for r in range(R)]
        sync()
        t_ring = time.perf_counter() - t0
        got = torch.cat([o for o, _ in parts], dim=2).float().flatten()
        ref = want.float().flatten()
        finite = bool(torch.isfinite(got).all())
        cos = float(torch.nn.functional.cosine_similarity(got, ref, dim=0))
        rel = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
        ok = finite and rel <= bound
        extra = ""
        if exact is not None:
            e_ring, e_full = (float((x - exact).norm() / exact.norm()) for x in (got, ref))
            ok = finite and e_ring <= 1.25 * e_full + bound / 10
            extra = f" | vs exact: shards {e_ring:.2e}, unsplit {e_full:.2e}"
        label = f"{case} R={R} (shards of {shards.size} tokens)"
        print(f"{'PASS' if ok else 'FAIL'} {label:<58} cos {cos:.6f} rel_l2 {rel:.2e} (bound {bound:.0e}){extra} "
              f"unsplit {t_full * 1e3:.1f} ms, {R} shards {t_ring * 1e3:.1f} ms", flush=True)
        if not ok:
            failures.append(label)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    global DEVICE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the references), to test the script")
    smoke = p.parse_args(argv).smoke
    if smoke:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("FAIL no CUDA GPU: this check runs the Triton kernels at workload sizes (--smoke: CPU, tiny)")
        return 1
    failures.clear()
    gen = torch.Generator().manual_seed(0)
    # Wan2.1-14B 720p (21x45x80 = 75,600 tokens): shards of 37,800 / 18,900 tokens are not multiples
    # of 64, so blocks straddle shards (key pieces, padded queries); random calibrated-style masks.
    wan720 = site_of(TokenGrid(3, 5, 8) if smoke else TokenGrid(21, 45, 80), 8, 16 if smoke else 128)
    block = 16 if smoke else 64
    heads = random_mask_heads(wan720, 6, block, gen) + [HeadPlan(block_m=block, block_n=block),
                                                        HeadPlan(sparsity="skip", block_m=block, block_n=block)]
    check(f"wan14b-720p masks {block}x{block}", wan720, heads, (2, 4), BOUND["none"])
    # Wan2.1-1.3B 480p (21x30x52 = 32,760 tokens), 12 heads, patterns with 128x128 blocks.
    wan480 = site_of(TokenGrid(8, 3, 5) if smoke else TokenGrid(21, 30, 52), 12, 16 if smoke else 128)
    b = {"block_m": 16, "block_n": 16} if smoke else {"block_m": 128, "block_n": 128}
    pats = [HeadPlan(sparsity="pattern", pattern=LocalWindow(frames=1, height=8, width=8), **b),
            HeadPlan(sparsity="pattern", pattern=TemporalDiagonals(spatial_radius=2), **b),
            HeadPlan(sparsity="pattern", pattern=Radial(spatial_radius=8), **b), HeadPlan(**b)]
    check("wan1.3b-480p patterns", wan480, pats * 3, (2, 4, 8), BOUND["none"])
    # Shards of whole frames (16x64x64 = 65,536 tokens): token orders per shard and dynamic heads.
    grid = TokenGrid(4, 4, 8) if smoke else TokenGrid(16, 64, 64)
    d = 16 if smoke else 128
    site = site_of(grid, 8, d)
    b = {"block_m": 16, "block_n": 16} if smoke else {"block_m": 64, "block_n": 64}
    mixed = [HeadPlan(sparsity="pattern", pattern=LocalWindow(frames=1, height=8, width=8), order="fwh", **b),
             HeadPlan(sparsity="dynamic", dynamic=DynamicSpec("top_k", 0.1), **b),
             HeadPlan(sparsity="dynamic", dynamic=DynamicSpec("cumulative_mass", 0.9), order="fwh", **b),
             HeadPlan(sparsity="pattern", pattern=TemporalDiagonals(spatial_radius=4), **b)] * 2
    check(f"{grid} orders + dynamic", site, mixed, (2, 4), BOUND["none"])
    quant = [HeadPlan(quant=q, **b) for q in ("int8", "fp8", "int8_fp8")] + \
            [HeadPlan(sparsity="pattern", pattern=TemporalDiagonals(spatial_radius=4), quant="int8", **b)]
    exact = [HeadPlan(**{**hp.__dict__, "quant": "none"}) for hp in quant]
    check(f"{grid} quantized (int8, fp8, int8_fp8)", site_of(grid, 4, d), quant, (2, 4), BOUND["quant"], exact)
    print("ALL PASS" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
