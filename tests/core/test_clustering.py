"""Semantic clustering order (Sparse VideoGen 2, vsopt.core.clustering): k-means, the permutation,
the cluster-pair block table, the plan schema, and that nothing in the op syncs with the host."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vsopt.core import semantics
from vsopt.core.clustering import (ClusterSpec, cluster_keep, cluster_layout, cluster_layout_op, clustered_attention,
                                   initial_centroids, kmeans, reference_clustered_attention)
from vsopt.core.errors import PlanError
from vsopt.core.ir import TokenGrid
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity


def _dense64(q, k, v, scale):
    return torch.softmax(scale * q.double() @ k.double().transpose(-1, -2), -1) @ v.double()


def _qkv(B, H, N, D, seed, dtype=torch.float64, Nk=None):
    g = torch.Generator().manual_seed(seed)
    Nk = Nk or N
    return (torch.randn(B, H, N, D, generator=g, dtype=dtype), torch.randn(B, H, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, H, Nk, D, generator=g, dtype=dtype))


@pytest.mark.parametrize("B, H, N, D, cq, ck, block, span", [
    (1, 2, 50, 8, 4, 6, 16, None), (2, 3, 77, 16, 5, 9, 16, (3, 70)), (1, 1, 130, 32, 16, 40, 32, (0, 129)),
    (2, 2, 33, 8, 40, 3, 16, None),  # more query clusters than tokens: empty clusters
])
def test_top_p_one_is_dense_attention_exactly(B, H, N, D, cq, ck, block, span):
    q, k, v = _qkv(B, H, N, D, seed=N)
    scale = D ** -0.5
    lay = cluster_layout(q, k, ClusterSpec(cq, ck, 1.0), scale, block, block, span, span)
    assert bool(lay.masks.all())
    out = clustered_attention(q, k, v, lay, scale, "none", block, block)
    torch.testing.assert_close(out, _dense64(q, k, v, scale), rtol=0, atol=1e-12)
    # the permutation really reorders (the test is not passing through the identity)
    ident = torch.arange(N).expand_as(lay.perm_q)
    assert not (torch.equal(lay.perm_q, ident) and torch.equal(lay.perm_k, ident))


@pytest.mark.parametrize("B, H, N, Nk, D, top_p", [(1, 2, 64, 64, 8, 0.5), (2, 2, 45, 71, 16, 0.7), (1, 3, 97, 97, 8, 0.3)])
def test_sparse_clustered_attention_matches_the_token_mask_reference(B, H, N, Nk, D, top_p):
    q, k, v = _qkv(B, H, N, D, seed=7 * N, Nk=Nk)
    # clustered data: four directions, so that clusters and a sparse table exist
    dirs = torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    q = q + dirs[torch.arange(N) % 4]
    k = k + dirs[(torch.arange(Nk) * 7) % 4]
    scale = D ** -0.5
    lay = cluster_layout(q, k, ClusterSpec(4, 4, top_p, iterations=5), scale, 16, 16)
    density = float(lay.masks.float().mean())
    assert density < 1.0
    out = clustered_attention(q, k, v, lay, scale, "none", 16, 16)
    torch.testing.assert_close(out, reference_clustered_attention(q, k, v, lay, scale, 16, 16), rtol=0, atol=1e-12)
    assert (out - _dense64(q, k, v, scale)).abs().max() > 1e-6  # sparse: not dense attention


def test_block_table_keeps_a_block_when_any_cluster_pair_in_it_is_kept():
    B, H, N, D, bm, bn = 1, 2, 70, 8, 8, 16
    q, k, _ = _qkv(B, H, N, D, seed=3)
    dirs = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    q, k = q + dirs[torch.arange(N) % 5], k + dirs[(torch.arange(N) * 3) % 5]
    spec = ClusterSpec(6, 5, 0.6, iterations=4)
    scale = D ** -0.5
    lay = cluster_layout(q, k, spec, scale, bm, bn, (2, 66), (2, 66))
    for h in range(H):
        lq, cq, _ = kmeans(q[0, h:h + 1, 2:66], 6, 4)
        lk, ck, nk = kmeans(k[0, h:h + 1, 2:66], 5, 4)
        keep = cluster_keep(cq, ck, nk, scale, 0.6)[0]
        label_q = torch.full((N,), -1)
        label_q[2:66] = lq[0]
        label_k = torch.full((N,), -1)
        label_k[2:66] = lk[0]
        pq, pk = lay.perm_q[0, h], lay.perm_k[0, h]
        # the clusters are contiguous after the permutation, text tokens keep their places
        assert torch.equal(pq[:2], torch.arange(2)) and torch.equal(pq[66:], torch.arange(66, N))
        assert bool((label_q[pq][2:66].diff() >= 0).all())
        want = torch.zeros(lay.masks.shape[2:], dtype=torch.bool)
        for i in range(want.shape[0]):
            for j in range(want.shape[1]):
                a = label_q[pq[i * bm:(i + 1) * bm]].tolist()
                b = label_k[pk[j * bn:(j + 1) * bn]].tolist()
                want[i, j] = any(x < 0 or y < 0 or bool(keep[x, y]) for x in a for y in b)
        assert torch.equal(lay.masks[0, h], want)
    assert 0 < float(lay.masks.float().mean()) < 1


def _lloyd64(x, c, iterations):
    """Lloyd's k-means written plainly in float64 (one head)."""
    x, c = x.double(), c.double().clone()
    for _ in range(iterations):
        lab = torch.cdist(x, c).argmin(-1)
        for j in range(c.shape[0]):
            if (lab == j).any():
                c[j] = x[lab == j].mean(0)
    return torch.cdist(x, c).argmin(-1), c


def test_kmeans_is_deterministic_and_is_lloyds_algorithm():
    x = torch.randn(3, 200, 8, generator=torch.Generator().manual_seed(5))
    a = kmeans(x, 7, 6)
    b = kmeans(x.clone(), 7, 6)
    for u, w in zip(a, b):
        assert torch.equal(u, w)
    init = initial_centroids(x, 7)
    assert torch.equal(init, x[:, torch.tensor([0, 33, 66, 99, 132, 165, 199])])
    for g in range(3):
        lab, cent = _lloyd64(x[g], init[g], 6)
        assert torch.equal(a[0][g], lab)
        torch.testing.assert_close(a[1][g].double(), cent, rtol=1e-5, atol=1e-5)
    assert torch.equal(a[2].sum(-1), torch.full((3,), 200.0))


def test_warm_start_from_converged_centroids_keeps_the_clustering():
    x = torch.randn(2, 150, 8, generator=torch.Generator().manual_seed(9))
    lab, cent, _ = kmeans(x, 5, 30)
    lab2, cent2, _ = kmeans(x, 5, 2, init=cent)
    assert torch.equal(lab, lab2)
    cold = kmeans(x, 5, 0)[0]
    assert not torch.equal(cold, lab)  # the iterations do change the clustering
    with pytest.raises(ValueError, match="init centroids"):
        kmeans(x, 6, 1, init=cent)


_SYNCING = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose", "unique", "_unique2",
            "masked_select", "repeat_interleave"}  # repeat_interleave with a tensor of repeats syncs


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_clustering_runs_no_op_that_syncs_with_the_host():
    """What vsopt::cluster_layout runs on the device (cluster_layout, cold and warm-started), op by
    op: nothing that reads a value back to the host (so it is CUDA-graph safe and never stalls)."""
    q, k, _ = _qkv(2, 2, 90, 16, seed=11, dtype=torch.float32)
    spec = ClusterSpec(6, 8, 0.8, iterations=5, warm_iterations=2)
    cold = cluster_layout(q, k, spec, 0.25, 16, 16, (4, 86), (4, 86))
    with _Ops() as mode:
        cold = cluster_layout(q, k, spec, 0.25, 16, 16, (4, 86), (4, 86))
        cluster_layout(q, k, spec, 0.25, 16, 16, (4, 86), (4, 86), init=(cold.centroids_q, cold.centroids_k))
    names = set(mode.names)
    assert {"bmm", "sort", "argmax", "scatter_add_", "scatter_"} <= names, names  # the op's work is seen by the mode
    assert not names & _SYNCING, names & _SYNCING
    # the check can fail: an op that reads a value on the host is seen
    with _Ops() as mode:
        q.sum().item()
    assert "_local_scalar_dense" in mode.names


def test_cluster_spec_and_head_plan_schema():
    spec = ClusterSpec(16, 32, 0.8, refresh=3, iterations=6, warm_iterations=1)
    head = HeadPlan(Sparsity.CLUSTER, cluster=spec, block_m=32, block_n=32)
    d = head.to_json(None)
    assert d["order"] == "cluster" and d["sparsity"] == "cluster" and d["cluster"]["refresh"] == 3
    back = HeadPlan.from_json(json.loads(json.dumps(d)), {}, "t")
    assert back == head
    for bad, msg in [(dict(q_clusters=0), "q_clusters"), (dict(top_p=1.5), "top_p"), (dict(top_p=0), "top_p"),
                     (dict(refresh=0), "refresh"), (dict(iterations=-1), "iterations"), (dict(k_clusters=2.5), "k_clusters")]:
        with pytest.raises(ValueError, match=msg):
            ClusterSpec(**bad)
    with pytest.raises(ValueError, match="needs `cluster`"):
        HeadPlan(Sparsity.CLUSTER)
    with pytest.raises(ValueError, match="must not set `cluster`"):
        HeadPlan(Sparsity.DENSE, cluster=spec)
    with pytest.raises(ValueError, match="order must be 'fhw'"):
        HeadPlan(Sparsity.CLUSTER, cluster=spec, order="hwf")
    with pytest.raises(PlanError, match="order 'cluster' goes with sparsity 'cluster'"):
        HeadPlan.from_json({"sparsity": "dense", "order": "cluster"}, {}, "t")
    with pytest.raises(PlanError, match="unknown field"):
        HeadPlan.from_json({"sparsity": "cluster", "order": "cluster", "cluster": {"clusters": 3}}, {}, "t")


def test_plan_with_cluster_heads_saves_and_loads(tmp_path):
    grid = TokenGrid(2, 4, 4)
    heads = (HeadPlan(Sparsity.CLUSTER, cluster=ClusterSpec(4, 4, 0.9), block_m=16, block_n=16), HeadPlan(block_m=16, block_n=16))
    plan = Plan({"s": SitePlan("s", 2, 32, 32, grid, heads)})
    back = Plan.load(plan.save(tmp_path / "c.plan.json"))
    assert back["s"].heads == heads
    assert back.density() is None  # input-dependent


def test_semantics_site_output_and_densities_of_cluster_heads():
    grid = TokenGrid(2, 4, 6, text_before=5)
    site = SimpleNamespace(site_id="s", batch=1, heads=3, head_dim=8, q_len=grid.num_tokens, kv_len=grid.num_tokens,
                           grid=grid, dtype=torch.float32)
    q, k, v = _qkv(1, 3, grid.num_tokens, 8, seed=2, dtype=torch.float32)
    spec = ClusterSpec(4, 4, 0.5)
    heads = (HeadPlan(Sparsity.CLUSTER, cluster=spec, block_m=16, block_n=16), HeadPlan(block_m=16, block_n=16),
             HeadPlan(Sparsity.CLUSTER, cluster=ClusterSpec(3, 3, 1.0), block_m=16, block_n=16))
    out = semantics.site_output(site, heads, q, k, v, 0.35)
    dense = _dense64(q, k, v, 0.35)
    torch.testing.assert_close(out[:, 1:].double(), dense[:, 1:], rtol=1e-5, atol=1e-5)
    lay = cluster_layout(q[:, :1], k[:, :1], spec, 0.35, 16, 16, (5, 53), (5, 53))
    torch.testing.assert_close(out[:, :1].double(), reference_clustered_attention(q[:, :1], k[:, :1], v[:, :1], lay, 0.35,
                                                                                 16, 16), rtol=1e-5, atol=1e-5)
    dens = semantics.head_densities(site, heads, q, k, 0.35)
    assert dens[1] == 1.0 and dens[2] == 1.0 and dens[0] == pytest.approx(float(lay.masks.float().mean()))
    with pytest.raises(Exception, match="cluster head's density needs q/k"):
        semantics.head_densities(site, heads)
    work = semantics.site_work(site, heads, dens)
    # two cluster launches (specs differ) + their k-means as tile-equivalent launches + the dense head
    assert len(work.launches) == 5 and work.permuted_mib > 0 and work.scored_blocks == 0
    kmeans_tiles = [w for w in work.launches if w.query_blocks == 0]
    assert len(kmeans_tiles) == 2 and all(w.visited_blocks > 0 for w in kmeans_tiles)


def test_cuda_graph_plans_cluster_cold_and_keep_no_state():
    from vsopt.core import clustering
    from vsopt.cudagraphs import plan_for_cudagraphs

    grid = TokenGrid(2, 4, 4)
    head = HeadPlan(Sparsity.CLUSTER, cluster=ClusterSpec(4, 4, 0.9, refresh=3), block_m=16, block_n=16)
    plan = Plan({"s": SitePlan("s", 2, 32, 32, grid, (head, HeadPlan(block_m=16, block_n=16)))})
    (h, dense) = plan_for_cudagraphs(plan)["s"].heads
    assert h.cluster.refresh == 1 and not h.cluster.warm_start and dense == HeadPlan(block_m=16, block_n=16)
    q, k, _ = _qkv(1, 2, 40, 8, seed=1, dtype=torch.float32)
    clustering.CLUSTER_STATE.reset()
    args = (q, k, 0.3, 16, 16, 4, 4, 0.9, 1, 3, 1)
    pq, pk, m = cluster_layout_op(*args, False, 0, 40, 0, 40, "stateless")
    assert not clustering.CLUSTER_STATE._entries  # nothing kept: safe to replay in a CUDA graph
    lay = cluster_layout(q, k, ClusterSpec(4, 4, 0.9, iterations=3, warm_iterations=1), 0.3, 16, 16)
    assert torch.equal(pq, lay.perm_q) and torch.equal(pk, lay.perm_k) and torch.equal(m, lay.masks)
    cluster_layout_op(*args, True, 0, 40, 0, 40, "kept")
    assert "kept" in clustering.CLUSTER_STATE._entries
    clustering.CLUSTER_STATE.reset()


def test_onnx_export_refuses_cluster_heads_in_one_line():
    from types import SimpleNamespace as NS

    from vsopt.core.errors import ConfigError
    from vsopt.deploy.onnx import check_options

    grid = TokenGrid(2, 4, 4)
    head = HeadPlan(Sparsity.CLUSTER, cluster=ClusterSpec(4, 4, 0.9), block_m=16, block_n=16)
    plan = Plan({"s": SitePlan("s", 1, 32, 32, grid, (head,))})
    with pytest.raises(ConfigError, match=r"cluster heads .* at \['s'\], which have no ONNX form"):
        check_options(NS(plan=plan, quant_modes=()), "portable", 18)
    check_options(NS(plan=Plan({}), quant_modes=()), "portable", 18)  # without them: accepted
