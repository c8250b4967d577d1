"""The plan each sparse-attention method runs at a target density (the methods are listed in the
package doc): every method is a Plan, so all of them run through the same rewrite and kernels."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from vsopt.benchmark.settings import BenchSettings, Method
from vsopt.calibration.clusters import cluster_specs
from vsopt.core import semantics
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.errors import ConfigError
from vsopt.core.ir import AttentionSite, TokenGrid
from vsopt.core.patterns import LocalWindow, Pattern, Radial, block_mask
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity
from vsopt.core.rettention import Correction, Renorm


def _closest(patterns: Sequence[Pattern], grid: TokenGrid, target: float, block: int) -> tuple[Pattern, float]:
    scored = [(p, float(block_mask(p, grid, block_m=block, block_n=block).float().mean())) for p in patterns]
    return min(scored, key=lambda pd: (abs(pd[1] - target), pd[1]))


def window_pattern(grid: TokenGrid, target: float, block: int) -> tuple[Pattern, float]:
    """The 3D local window with block density closest to `target`."""
    span = max(grid.height, grid.width)
    return _closest([LocalWindow(f, s, s) for f in range(grid.frames) for s in range(span)], grid, target, block)


def radial_pattern(grid: TokenGrid, target: float, block: int) -> tuple[Pattern, float]:
    """The Radial Attention mask with block density closest to `target`."""
    span = max(grid.height, grid.width)
    return _closest([Radial(s, f) for f in range(1, grid.frames + 1) for s in range(span)], grid, target, block)


def cluster_plan(sites: Sequence[AttentionSite], settings: BenchSettings, density: float,
                 calls: Mapping[str, object]) -> tuple[Plan, float, float]:
    """(plan, top_p, density) of the "cluster" method: the top-p, bisected on the recorded q/k of
    `calls` (site_id -> SiteCall, one denoising step), whose mean block density over the sites is
    closest to `density` (a cold clustering, as at a first step)."""
    b, quant = settings.block, settings.quant

    def plan_at(p: float) -> Plan:
        specs = cluster_specs(sites, b, p, settings.cluster_clusters, settings.cluster_refresh)
        return Plan({s.site_id: SitePlan.for_site(s, HeadPlan(Sparsity.CLUSTER, quant=quant, block_m=b, block_n=b,
                                                                cluster=specs[s.site_id])) for s in sites})

    def measured(plan: Plan) -> float:
        ds = [d for s in sites for d in semantics.head_densities(s, plan[s.site_id].heads, calls[s.site_id].q,
                                                                  calls[s.site_id].k, calls[s.site_id].scale)]
        return sum(ds) / len(ds)

    lo, hi = 0.0, 1.0  # density grows with top_p
    best = (1.0, measured(plan_at(1.0)))
    for _ in range(10):
        mid = (lo + hi) / 2
        d = measured(plan_at(mid))
        if abs(d - density) < abs(best[1] - density):
            best = (mid, d)
        lo, hi = (mid, hi) if d < density else (lo, mid)
    return plan_at(best[0]), best[0], best[1]


def method_plan(method: Method, sites: Sequence[AttentionSite], density: float, settings: BenchSettings,
                calibrate_fn: Callable[[float], Plan] | None = None,
                calls: Mapping[str, object] | None = None) -> tuple[Plan, list[str]]:
    """The plan `method` runs at `density`, and notes on how it was made. Only self-attention
    sites with a known grid are made sparse; the rest stay dense (cross-attention to a few text
    tokens is cheap). calibrate_fn(density): vsopt's calibrated plan (PlanScorer.calibrated_plan).
    calls: site_id -> SiteCall of the dense model at one step, which "cluster" chooses its top-p on."""
    video = [s for s in sites if s.is_self_attention and s.grid is not None]
    b, quant = settings.block, settings.quant
    if method is Method.DENSE:
        return Plan.dense(sites), []
    if method is Method.SAGE:
        return Plan.uniform(video, HeadPlan(quant=Quant.INT8, block_m=b, block_n=b)), ["dense INT8 QK"]
    if method is Method.TOPK:
        head = HeadPlan(Sparsity.DYNAMIC, quant=quant, block_m=b, block_n=b,
                        dynamic=DynamicSpec(DynamicMethod.TOP_K, density))
        return Plan.uniform(video, head), [f"top-k {density:.2f} of key blocks per row"]
    if method is Method.WARMUP:
        k, steps = settings.warmup_steps, settings.steps
        # the steps after the warm-up sparser, so that the mean density over the steps is `density`
        rest = (density * steps - k) / (steps - k)
        if rest <= 0:
            raise ConfigError(f"warmup: {k} dense step(s) of {steps} alone exceed density {density}; lower "
                              f"warmup_steps")
        rest = min(1.0, rest)
        head = HeadPlan(Sparsity.DYNAMIC, quant=quant, block_m=b, block_n=b,
                        dynamic=DynamicSpec(DynamicMethod.TOP_K, rest))
        return Plan.uniform(video, head).with_dense_warmup(k), [
            f"first {k} of {steps} steps dense, then top-k {rest:.3f} of key blocks per row"]
    if method is Method.REUSE:
        r = settings.mask_refresh
        head = HeadPlan(Sparsity.DYNAMIC, quant=quant, block_m=b, block_n=b,
                        dynamic=DynamicSpec(DynamicMethod.TOP_K, density, reuse_steps=r - 1))
        return Plan.uniform(video, head), [f"top-k {density:.2f}, masks computed every {r} steps and reused between"]
    if method is Method.PSA:
        head = HeadPlan(Sparsity.DYNAMIC, quant=quant, block_m=b, block_n=b, remainder="pooled",
                        dynamic=DynamicSpec(DynamicMethod.TOP_K, density))
        return Plan.uniform(video, head), [f"top-k {density:.2f} of key blocks per row, the rest attended "
                                           "mean-pooled (separate ATen ops, not in the kernel)"]
    if method in (Method.RETTENTION, Method.RETTENTION_POOLED, Method.RESIDUAL):
        r, steps = settings.renorm_every, settings.steps
        kept, how = density, "measured with the pooled remainder"
        if method in (Method.RETTENTION, Method.RESIDUAL):
            # steps 0, r, 2r, ... measure at full density: the others sparser, same mean density
            measuring = -(-steps // r)
            if measuring >= steps:
                raise ConfigError(f"{method.value}: every step of {steps} measures with renorm_every {r}; raise "
                                  "steps")
            kept = (density * steps - measuring) / (steps - measuring)
            if kept <= 0:
                raise ConfigError(f"{method.value}: {measuring} measuring (dense) step(s) of {steps} alone exceed "
                                  f"density {density}; raise renorm_every")
            kept, how = min(1.0, kept), f"measured exactly ({measuring} of {steps} steps dense)"
        kind = Correction.RESIDUAL if method is Method.RESIDUAL else Correction.MASS
        head = HeadPlan(Sparsity.DYNAMIC, quant=quant, block_m=b, block_n=b, renorm=Renorm(r, kind=kind),
                        remainder="pooled" if method is Method.RETTENTION_POOLED else "drop",
                        dynamic=DynamicSpec(DynamicMethod.TOP_K, kept))
        if method is Method.RESIDUAL:
            return Plan.uniform(video, head), [f"top-k {kept:.3f}, exact every {r} steps ({measuring} of {steps} "
                                               "dense), its error added to the sparse steps between (DiTFastAttn)"]
        return Plan.uniform(video, head), [f"top-k {kept:.3f}, dropped mass {how} every {r} steps and restored "
                                           "between (Re-ttention)"]
    if method is Method.CLUSTER:
        if calls is None:
            raise ConfigError("method 'cluster' needs the dense model's recorded q/k to choose its top-p")
        plan, top_p, d = cluster_plan(video, settings, density, calls)
        spec = next(iter(plan.sites.values())).heads[0].cluster if plan.sites else None
        return plan, [f"k-means orders ({spec.q_clusters if spec else 0}x{spec.k_clusters if spec else 0} clusters, "
                      f"refresh every {settings.cluster_refresh} step(s), warm-started), key clusters by centroid "
                      f"top-p {top_p:.4f} (block density {d:.3f} on the scored step)"]
    if method in (Method.WINDOW, Method.RADIAL):
        grids = {s.grid for s in video}
        if len(grids) != 1:
            raise ConfigError(f"{method.value}: the self-attention sites have several grids {grids}")
        grid = grids.pop()
        pattern, d = (window_pattern if method is Method.WINDOW else radial_pattern)(grid, density, b)
        head = HeadPlan(Sparsity.PATTERN, pattern=pattern, quant=quant, block_m=b, block_n=b)
        return Plan.uniform(video, head), [f"{pattern} (block density {d:.3f})"]
    if method is Method.VSOPT:
        if calibrate_fn is None:
            raise ConfigError("method 'vsopt' needs calibration inputs")
        plan = calibrate_fn(density)
        return plan, [f"calibrated at density budget {density}"]
    raise ConfigError(f"unknown method {method!r}")
