"""Cluster heads (Sparse VideoGen 2, vsopt.core.clustering) through torch.compile(backend="vsopt")
and the project's sampler: the lowered graph, and the clustering refreshed every `refresh` steps
with its k-means warm-started from the previous centroids, its state kept across calls."""
import pytest
import torch

import vsopt.core.clustering as clustering
from vsopt.backend import trace_and_rewrite
from vsopt.core import semantics
from vsopt.core.clustering import ClusterSpec, cluster_layout, clustered_attention
from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import current_denoising_step
from vsopt.core.ir import TokenGrid
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity

from tests.e2e.test_step_options import HEADS, _compiled, _sample, _setup

vsopt_ops = torch.ops.vsopt


def _plan(site, spec, block=16):
    return Plan({site.site_id: SitePlan.for_site(site, HeadPlan(Sparsity.CLUSTER, cluster=spec, block_m=block,
                                                                block_n=block))})


def test_lowered_graph_runs_the_clustering_ops_and_the_semantics():
    grid = TokenGrid(3, 4, 6)
    model, example, site = _setup(grid, seed=4)
    spec = ClusterSpec(4, 6, 0.6, iterations=4)
    plan = _plan(site, spec)
    clustering.CLUSTER_STATE.reset()
    gm, report = trace_and_rewrite(model, example, VsoptConfig(plan=plan, grid=grid))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert vsopt_ops.cluster_layout.default in targets
    assert targets.count(vsopt_ops.permute_tokens.default) == 3 and vsopt_ops.unpermute_tokens.default in targets
    assert vsopt_ops.block_sparse_attention.default in targets and vsopt_ops.attention.default not in targets
    with torch.no_grad():
        got = gm(*example)[0]
        q, k, v = model.qkv_heads(example[0])
        want = model.finish(semantics.site_output(site, plan[site.site_id].heads, q, k, v, site.scale), example[0])[0]
        dense = model(*example)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - dense).abs().max() > 1e-5  # sparse: not the dense result
    dens = semantics.head_densities(site, plan[site.site_id].heads, q, k, site.scale)
    assert all(0 < d <= 1 for d in dens) and min(dens) < 1, dens


@pytest.mark.parametrize("grid, refresh, steps", [(TokenGrid(4, 4, 8), 1, 4), (TokenGrid(3, 6, 6), 2, 5)])
def test_sampler_refreshes_and_warm_starts_the_clustering(grid, refresh, steps, monkeypatch):
    model, example, site = _setup(grid, seed=1, gain=20.0)  # a large velocity: tokens move between steps
    spec = ClusterSpec(4, 6, 0.5, refresh=refresh, iterations=5, warm_iterations=1)
    plan = _plan(site, spec)
    calls = []
    real = clustering.cluster_layout

    def counting(q, k, spec_, scale, bm, bn, q_span=None, k_span=None, init=None):
        calls.append((current_denoising_step(), init is None))
        return real(q, k, spec_, scale, bm, bn, q_span, k_span, init)

    kept = {}

    def reference(x, t, c, return_dict=False):  # the meaning of the state rule, written out
        step = current_denoising_step()
        q, k, v = model.qkv_heads(x)
        at, lay = kept.get("layout", (None, None))
        if at is None or not (at <= step < at + refresh):
            init = (lay.centroids_q, lay.centroids_k) if at is not None and at < step else None
            lay = real(q, k, spec, site.scale, 16, 16, None, None, init)
            kept["layout"] = (step, lay)
        return model.finish(clustered_attention(q, k, v, lay, site.scale, "none", 16, 16).float(), x)

    def cold(x, t, c, return_dict=False):  # a fresh clustering at every step, no warm start
        q, k, v = model.qkv_heads(x)
        return model.finish(semantics.site_output(site, plan[site.site_id].heads, q, k, v, site.scale), x)

    clustering.CLUSTER_STATE.reset()
    with torch.no_grad():
        compiled = _compiled(model, plan, grid)
        monkeypatch.setattr(clustering, "cluster_layout", counting)
        got = _sample(compiled, example, grid, steps)
        first = list(calls)
        again = _sample(compiled, example, grid, steps)  # a second clip: step 0 starts cold again
        monkeypatch.setattr(clustering, "cluster_layout", real)
        want = _sample(reference, example, grid, steps)
        fresh = _sample(cold, example, grid, steps)
    refreshed = list(range(0, steps, refresh))
    assert first == [(s, s == 0) for s in refreshed]  # cold at step 0, warm at every later refresh
    assert calls == first + first
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, got, rtol=1e-6, atol=1e-6)
    assert (got - fresh).abs().max() > 1e-5  # warm starts (and reuse) do change the result


def test_calibration_chooses_cluster_heads_that_run_as_measured():
    """calibrate() on recorded sampler steps with only dense and cluster candidates under a density
    budget: the plan gives heads the cluster spec, and the compiled model under the sampler
    computes what the state rule (cold, then warm-started) computes from the meaning."""
    from vsopt.calibration import CalibrationOptions, DensityBudget, calibrate
    from vsopt.core.orders import TokenOrder
    from vsopt.core.plan import Quant

    from tests.core.test_calibrate_search import COST
    from tests.e2e.test_step_options import _recorded

    grid = TokenGrid(4, 4, 8)
    model, example, site = _setup(grid, seed=2, gain=5.0)
    steps = 3
    calls = _recorded(model, example, grid, steps)
    spec = ClusterSpec(4, 6, 0.5, iterations=4, warm_iterations=1)
    opts = CalibrationOptions(block_m=16, block_n=16, orders=(TokenOrder.FHW,), patterns=False, mass_shares=(),
                              dynamic=False, skip=False, quants=(Quant.NONE,), cost_model=COST, clusters=(spec,))
    plan = calibrate(model, calls, DensityBudget(0.8), options=opts, grid=grid, progress=False).plan
    heads = plan[site.site_id].heads
    assert any(h.sparsity is Sparsity.CLUSTER and h.cluster == spec for h in heads)
    kept = {}

    def reference(x, t, c, return_dict=False):
        step = current_denoising_step()
        q, k, v = model.qkv_heads(x)
        out = semantics.site_output(site, heads, q, k, v, site.scale).clone()   # the dense heads
        idx = [h for h, hp in enumerate(heads) if hp.cluster is not None]
        lay = kept.get("lay")
        init = None if lay is None else (lay.centroids_q, lay.centroids_k)
        lay = cluster_layout(q[:, idx], k[:, idx], spec, site.scale, 16, 16, init=init)
        kept["lay"] = lay
        out[:, idx] = clustered_attention(q[:, idx], k[:, idx], v[:, idx], lay, site.scale, "none", 16, 16).float()
        return model.finish(out, x)

    clustering.CLUSTER_STATE.reset()
    with torch.no_grad():
        got = _sample(_compiled(model, plan, grid), example, grid, steps)
        want = _sample(reference, example, grid, steps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
