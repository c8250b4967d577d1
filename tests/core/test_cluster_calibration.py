"""Cluster heads as calibration candidates (vsopt.calibration.clusters): offered, measured as the
runtime runs them (warm-started, refreshed), priced, and chosen into HeadPlans of sparsity cluster."""
import pytest
import torch

from vsopt.calibration import CalibrationOptions
from vsopt.calibration.choices import head_options, head_plan
from vsopt.calibration.measure import SiteState, build_candidates, measure_errors, measure_mass
from vsopt.core.clustering import ClusterSpec, cluster_layout, clustered_attention
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.plan import Quant, Sparsity

from tests.core.test_calibrate_search import COST
from tests.core.test_mask_reuse_calibration import _calls


@pytest.mark.parametrize("grid, refresh", [(TokenGrid(2, 4, 8), 1), (TokenGrid(3, 5, 7), 2)])
def test_cluster_candidates_are_measured_as_they_run(grid, refresh):
    site, calls = _calls(grid, 2, steps=4)
    spec = ClusterSpec(4, 6, 0.6, refresh=refresh, iterations=4, warm_iterations=1)
    opt = CalibrationOptions(block_m=16, block_n=16, orders=(TokenOrder.FHW,), patterns=False, mass_shares=(0.9,),
                             dynamic_values=(), dynamic_top_k=(0.3,), skip=False, clusters=(spec,))
    state = SiteState(site, opt, (TokenOrder.FHW,))
    for call in calls:
        measure_mass(state, call)
    build_candidates(state)
    labels = [c.label for c in state.candidates]
    c = labels.index(f"cluster(4x6,p0.6,every{refresh})")
    for s, call in enumerate(calls):
        measure_errors(state, call, s)
    # the reference: the runtime's rule (cold at step 0, reused within a refresh, warm after it)
    want, dens, kept = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), None
    for s, call in enumerate(calls):
        if kept is None or s >= kept[0] + refresh:
            init = None if kept is None else (kept[1].centroids_q, kept[1].centroids_k)
            kept = (s, cluster_layout(call.q, call.k, spec, 1.0, 16, 16, init=init))
        out = clustered_attention(call.q, call.k, call.v, kept[1], 1.0, "none", 16, 16)
        ref = torch.nn.functional.scaled_dot_product_attention(call.q, call.k, call.v, scale=1.0)
        want += (out.double() - ref.double()).pow(2).sum((0, 2, 3))
        dens += kept[1].masks.double().mean((-1, -2)).sum(0)
    torch.testing.assert_close(state.err2[:, c], want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(state.density[:, c], dens)
    assert 0 < float(state.density[:, c].mean()) / 4 < 1
    hp = head_plan(state, 0, c, Quant.NONE)
    assert hp.sparsity is Sparsity.CLUSTER and hp.cluster == spec and hp.order is TokenOrder.FHW
    # priced: its k-means costs scored work, more than a plain dense head's nothing
    opts = {o.candidate: o for o in head_options(state, COST, (Quant.NONE,))[0]}
    assert opts[c].time_us > 0


def test_cluster_options_are_checked():
    assert CalibrationOptions(clusters=({"q_clusters": 8, "k_clusters": 8, "top_p": 0.8},)).clusters == (
        ClusterSpec(8, 8, 0.8),)
    with pytest.raises(ConfigError, match="CalibrationOptions.clusters: ClusterSpec.top_p"):
        CalibrationOptions(clusters=({"top_p": 2.0},))
    with pytest.raises(ConfigError, match="must be a ClusterSpec"):
        CalibrationOptions(clusters=(0.9,))
