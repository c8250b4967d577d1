"""benchmarks/measure_cost_model.py without a GPU: the site it times is the site the plan means
(its emulation of lower_plan's ops equals semantics.site_output), and the reference plan's sites
are fitted to the other clip size it measures."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from vsopt.core import semantics
from vsopt.core.ir import AttentionSite, Layout, TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import num_blocks
from vsopt.core.plan import HeadPlan, Quant, Sparsity

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "measure_cost_model.py"


@pytest.fixture(scope="module")
def mcm():
    spec = importlib.util.spec_from_file_location("measure_cost_model", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DEV = "cpu"
    return mod


def _site(grid: TokenGrid, heads: int, d: int = 16) -> AttentionSite:
    n = grid.num_tokens
    return AttentionSite(site_id="s", layer=None, rule="t", layout=Layout.BHND, batch=2, heads=heads, kv_heads=heads,
                         head_dim=d, value_dim=d, q_len=n, kv_len=n, dtype=torch.float32, scale=d ** -0.5, grid=grid)


@pytest.mark.parametrize("orders,quants", [(("hwf", "fhw", "wfh"), ("none",) * 3),
                                            (("fhw",) * 3, ("none", "int8", "none"))])
def test_site_emulation_matches_the_plans_meaning(mcm, orders, quants):
    grid = TokenGrid(3, 5, 4)  # 60 tokens: odd sizes, a partial last block
    site = _site(grid, 3)
    g = torch.Generator().manual_seed(1)
    qb = kb = num_blocks(site.q_len, 16)
    heads = []
    for h, (o, qm) in enumerate(zip(orders, quants)):
        mask = torch.rand(qb, kb, generator=g) < 0.5
        mask |= torch.eye(qb, dtype=torch.bool)
        heads.append(HeadPlan(Sparsity.MASK, order=TokenOrder(o), quant=Quant(qm), block_m=16, block_n=16, mask=mask))
    q, k, v = (torch.randn(2, 60, 3, 16, generator=g).transpose(1, 2) for _ in range(3))  # the model's layout
    _, _, _, whole, permuted = mcm.site_ops(site, heads, q, k, v)
    want = semantics.site_output(site, heads, q, k, v, site.scale)
    assert permuted == (orders[0] != "fhw")
    torch.testing.assert_close(whole().float(), want, rtol=1e-5, atol=1e-5)


def test_dynamic_groups_are_not_emulated(mcm):
    from vsopt.core.plan import DynamicMethod, DynamicSpec

    site = _site(TokenGrid(2, 4, 4), 1)
    hp = HeadPlan(Sparsity.DYNAMIC, block_m=16, block_n=16, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.5))
    q, k, v = (torch.randn(2, 1, 32, 16) for _ in range(3))
    assert mcm.site_ops(site, [hp], q, k, v) is None


def test_reference_sites_at_both_sizes(mcm):
    small, large = mcm.reference_sites(4096), mcm.reference_sites(16384)
    assert [s.site_id for s, _, _ in small] == [s.site_id for s, _, _ in large] and len(small) == 6
    for site, sp, line in large:
        assert (site.q_len, site.batch, site.heads, site.head_dim) == (16384, 2, 4, 64)
        assert site.grid == TokenGrid(16, 32, 32) and sp.q_len == 16384
        assert "fitted to grid 16x32x32" in line
        for hp in sp.all_heads():
            m = hp.block_mask(sp.q_len, sp.kv_len, sp.grid)
            assert m is None or m.shape == (math.ceil(16384 / hp.block_m),) * 2
    for site, sp, line in small:
        assert "fits the site's size" in line
