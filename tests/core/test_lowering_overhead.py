"""The cost model's per-site lowering overhead measured per launch group and permutation
(benchmarks/host_overhead.py): its terms, their file form, and what vsopt.core.semantics charges a
site for them."""
import pytest
import torch

from vsopt.core import semantics
from vsopt.core.costmodel import OVERHEAD_KEYS, CostModel
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Quant, Sparsity

TERMS = {"eager": 40.0, "eager_per_launch": 25.0, "eager_permuted": 30.0,
         "cudagraphs": 3.0, "cudagraphs_per_launch": 2.0, "cudagraphs_permuted": 1.5}
COST = CostModel(gpu="test", launch_us={"none/d64/64x64": 2.0}, per_block_us={"none/d64/64x64": 0.01},
                 per_query_block_us={"none/d64/64x64": 0.01}, overhead_us=dict(TERMS))
GRID = TokenGrid(4, 8, 8)
SITE = semantics.SiteShape("blocks.0.attn1", 2, 4, 64, GRID.num_tokens, GRID.num_tokens, GRID, torch.bfloat16)


def heads(quants, orders):
    return [HeadPlan(Sparsity.PATTERN, o, qm, 64, 64, pattern=LocalWindow(1, 1, 1)) for qm, o in zip(quants, orders)]


def test_the_terms_add_up_per_group_and_permutation():
    assert COST.lowering_overhead_us(False) == 40.0
    assert COST.lowering_overhead_us(False, launch_groups=3, permuted=True) == 40.0 + 2 * 25.0 + 30.0
    assert COST.lowering_overhead_us(True, launch_groups=2) == 3.0 + 2.0
    assert COST.has_group_overhead(False) and COST.has_group_overhead(True)
    old = CostModel(gpu="old", launch_us={}, per_block_us={}, per_query_block_us={}, overhead_us={"eager": 129.0})
    assert not old.has_group_overhead(False)
    assert old.lowering_overhead_us(False, launch_groups=4, permuted=True) == 129.0   # only what was measured


def test_the_terms_survive_the_file_and_a_wrong_one_is_named(tmp_path):
    COST.save(tmp_path / "c.json")
    assert CostModel.load(tmp_path / "c.json").overhead_us == TERMS
    assert set(TERMS) == set(OVERHEAD_KEYS)
    bad = COST.to_dict()
    bad["overhead_us"] = {"eager_per_group": 1.0}
    with pytest.raises(ConfigError, match="overhead_us keys must be among"):
        CostModel.from_dict(bad)


@pytest.mark.parametrize("quants,orders,groups,permuted", [
    ((Quant.NONE,) * 4, (TokenOrder.FHW,) * 4, 1, False),
    ((Quant.NONE,) * 4, (TokenOrder.HWF, TokenOrder.WHF, TokenOrder.FHW, TokenOrder.HFW), 1, True),
    ((Quant.NONE, Quant.INT8, Quant.FP8, Quant.FP8), (TokenOrder.HWF,) * 4, 3, True),
    ((Quant.NONE, Quant.INT8, Quant.INT8_FP8, Quant.FP8), (TokenOrder.FHW,) * 4, 4, False),
])
def test_semantics_charges_the_site_as_lowered(quants, orders, groups, permuted):
    hs = heads(quants, orders)
    assert len(semantics.launch_groups(hs)) == groups and semantics.reorders(hs, GRID) == permuted
    for cudagraphs in (False, True):
        want = COST.lowering_overhead_us(cudagraphs, groups, permuted)
        assert semantics.lowering_overhead_us(SITE, hs, COST, cudagraphs) == pytest.approx(want)


def test_a_dense_plan_costs_nothing_to_lower():
    dense = [HeadPlan(Sparsity.DENSE, o) for o in (TokenOrder.FHW, TokenOrder.HWF, TokenOrder.FHW, TokenOrder.FHW)]
    assert semantics.lowering_overhead_us(SITE, dense, COST, False) == 0.0
