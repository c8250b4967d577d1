"""The bench's methods for the accuracy options (warmup, reuse, psa): each a plan of the asked
mean density over the sampler's steps, with the option the method stands for."""
import pytest

from vsopt.benchmark import BenchSettings, Method, method_plan, plan_density
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.plan import Remainder, Sparsity

from tests.e2e.test_bench import _site


@pytest.mark.parametrize("steps, warm, density", [(10, 1, 0.2), (4, 1, 0.5), (8, 2, 0.3)])
def test_warmup_method_runs_the_first_steps_dense_at_the_same_mean_density(steps, warm, density):
    site = _site(TokenGrid(8, 16, 16))
    settings = BenchSettings(block=64, steps=steps, warmup_steps=warm)
    plan, notes = method_plan(Method.WARMUP, [site], density, settings)
    assert plan.dense_warmup == warm and f"first {warm} of {steps}" in notes[0]
    for s in range(warm):
        assert all(h.sparsity is Sparsity.DENSE for h in plan[site.site_id].heads_at(s))
    assert plan[site.site_id].heads_at(warm)[0].sparsity is Sparsity.DYNAMIC
    # mean over the steps (a top-k head counts at its fraction; this grid's 128 key blocks make
    # ceil(fraction * KB) close to it)
    assert plan_density(plan, [site], None, steps) == pytest.approx(density, abs=0.01)


def test_warmup_method_that_cannot_reach_the_density_says_so():
    site = _site(TokenGrid(8, 16, 16))
    with pytest.raises(ConfigError, match="1 dense step.* of 4 alone exceed density 0.2"):
        method_plan(Method.WARMUP, [site], 0.2, BenchSettings(block=64, steps=4, warmup_steps=1))
    with pytest.raises(ConfigError, match="warmup_steps"):
        BenchSettings(steps=4, warmup_steps=4)
    with pytest.raises(ConfigError, match="mask_refresh"):
        BenchSettings(mask_refresh=0)


def test_reuse_and_psa_methods():
    site = _site(TokenGrid(8, 16, 16))
    reuse, _ = method_plan(Method.REUSE, [site], 0.3, BenchSettings(block=64, mask_refresh=3))
    (h, *_) = reuse[site.site_id].heads
    assert h.dynamic.reuse_steps == 2 and h.dynamic.value == 0.3 and not reuse.step_boundaries()
    psa, notes = method_plan(Method.PSA, [site], 0.3, BenchSettings(block=64))
    (h, *_) = psa[site.site_id].heads
    assert h.remainder is Remainder.POOLED and h.sparsity is Sparsity.DYNAMIC and "not in the kernel" in notes[0]
    assert plan_density(psa, [site]) == pytest.approx(0.3)  # the kept blocks; the pooled rest is not counted


@pytest.mark.parametrize("steps, every, density", [(10, 5, 0.3), (8, 2, 0.6), (12, 6, 0.3)])
def test_rettention_methods_measure_every_r_steps_at_the_asked_mean_density(steps, every, density):
    from vsopt.core.rettention import Phase, Renorm

    site = _site(TokenGrid(8, 16, 16))
    settings = BenchSettings(block=64, steps=steps, renorm_every=every)
    plan, notes = method_plan(Method.RETTENTION, [site], density, settings)
    (h, *_) = plan[site.site_id].heads
    assert h.renorm == Renorm(every) and h.remainder is Remainder.DROP and "Re-ttention" in notes[0]
    phases = [plan.at_step(s)[site.site_id].heads[0].renorm.phase for s in range(steps)]
    assert phases == [Phase.MEASURE if s % every == 0 else Phase.CORRECT for s in range(steps)]
    # the measuring steps count every block; the mean over the steps is the asked density
    assert plan_density(plan, [site], None, steps) == pytest.approx(density, abs=0.01)
    pooled, _ = method_plan(Method.RETTENTION_POOLED, [site], density, settings)
    (h, *_) = pooled[site.site_id].heads
    assert h.remainder is Remainder.POOLED and h.dynamic.value == density
    assert plan_density(pooled, [site], None, steps) == pytest.approx(density, abs=0.01)


def test_rettention_method_that_cannot_reach_the_density_says_so():
    site = _site(TokenGrid(8, 16, 16))
    with pytest.raises(ConfigError, match="measuring .* of 4 alone exceed density 0.2"):
        method_plan(Method.RETTENTION, [site], 0.2, BenchSettings(block=64, steps=4, renorm_every=2))
    with pytest.raises(ConfigError, match="renorm_every"):
        BenchSettings(renorm_every=1)


def test_cluster_method_bisects_its_top_p_to_the_density():
    import torch

    from vsopt.calibration.capture import SiteCall
    from vsopt.core import semantics

    grid = TokenGrid(4, 8, 8)
    site = _site(grid)
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(6, 32, generator=g) * 2
    n = grid.num_tokens
    q = torch.randn(1, 2, n, 32, generator=g) + dirs[torch.arange(n) % 6]
    k = torch.randn(1, 2, n, 32, generator=g) + dirs[(torch.arange(n) * 5) % 6]
    call = SiteCall(site.site_id, q, k, torch.randn(1, 2, n, 32, generator=g), None, 0.18, False, None)
    settings = BenchSettings(block=16, cluster_refresh=2)
    plan, notes = method_plan(Method.CLUSTER, [site], 0.4, settings, calls={site.site_id: call})
    (h, *_) = plan[site.site_id].heads
    assert h.sparsity is Sparsity.CLUSTER and h.cluster.refresh == 2 and h.cluster.k_clusters == 16  # 256 / 16
    dens = semantics.head_densities(site, plan[site.site_id].heads, q, k, 0.18)
    assert sum(dens) / 2 == pytest.approx(0.4, abs=0.08) and "top-p" in notes[0]
    assert plan_density(plan, [site], {site.site_id: call}) == pytest.approx(sum(dens) / 2)
    with pytest.raises(ConfigError, match="needs the dense model's recorded q/k"):
        method_plan(Method.CLUSTER, [site], 0.4, settings)
    with pytest.raises(ConfigError, match="cluster_refresh"):
        BenchSettings(cluster_refresh=0)
