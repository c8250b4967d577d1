"""Head balancing: the assignment is a permutation of each site's heads, it never predicts a slower
slowest rank, it evens out an imbalanced plan, and permuting a model's heads together with its
plan changes nothing numerically."""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from vsopt.core.costmodel import CostModel
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, SitePlan
from vsopt.parallel.balance import apply_head_order, balance_heads

GRID = TokenGrid(8, 30, 52)   # Wan 480p latents: 12,480 tokens
N = GRID.num_tokens


def _plan(heads) -> Plan:
    return Plan({"blocks.0.attn1": SitePlan("blocks.0.attn1", len(heads), N, N, GRID, tuple(heads))})


def _imbalanced(num_heads=8) -> list[HeadPlan]:
    sparse = HeadPlan(sparsity="pattern", pattern=LocalWindow(frames=1, height=4, width=4))
    return [HeadPlan()] * (num_heads // 4) + [sparse] * (num_heads // 4) + [HeadPlan(sparsity="skip")] * (num_heads // 2)


# A throughput-bound cost model (time grows with the blocks computed): the balancing itself, not the
# shipped model's numbers (its span term prices a rank with one dense head at 12,480 tokens like one
# with two: the GPU is not full at batch 1, measured on the H200).
LINEAR = CostModel("linear", {"none/d128/64x64": 10.0}, {"none/d128/64x64": 0.005}, {"none/d128/64x64": 0.02},
                   permute_us_per_mib=1.0)


@pytest.mark.parametrize("degree", [2, 4])
def test_balancing_evens_out_the_ranks(degree):
    b = balance_heads(_plan(_imbalanced()), degree, head_dim=128, cost=LINEAR).sites["blocks.0.attn1"]
    assert sorted(b.order) == list(range(8))
    assert max(b.after_us) < 0.8 * max(b.before_us)
    assert max(b.after_us) - min(b.after_us) < max(b.before_us) - min(b.before_us)


def test_balanced_plan_is_the_same_heads_reordered():
    plan = _plan(_imbalanced())
    balance = balance_heads(plan, 2, head_dim=128)
    order = balance.orders["blocks.0.attn1"]
    balanced = balance.apply(plan)["blocks.0.attn1"]
    assert balanced.heads == tuple(plan["blocks.0.attn1"].heads[h] for h in order)
    assert balance.apply(plan).meta["head_balance"]["orders"]["blocks.0.attn1"] == list(order)
    totals = balance.totals()
    assert totals["ideal_us"] <= totals["after_us"] <= totals["before_us"]
    assert "slowest rank" in balance.report() and "blocks.0.attn1: per rank" in balance.report()


def test_a_balanced_plan_is_kept():
    heads = [HeadPlan(), HeadPlan(sparsity="skip")] * 2   # identity already puts one dense head per rank
    b = balance_heads(_plan(heads), 2, head_dim=128).sites["blocks.0.attn1"]
    assert max(b.after_us) <= max(b.before_us) + 1e-9


def test_cumulative_mass_heads_need_measured_densities():
    from vsopt.core.dynamic import DynamicSpec

    heads = [HeadPlan(sparsity="dynamic", dynamic=DynamicSpec("cumulative_mass", 0.9)), HeadPlan()]
    with pytest.raises(ConfigError, match="pass densities="):
        balance_heads(_plan(heads), 2, head_dim=128)
    b = balance_heads(_plan(heads), 2, head_dim=128, densities={"blocks.0.attn1": [0.3, 1.0]})
    assert sorted(b.sites["blocks.0.attn1"].order) == [0, 1]


def _worker():
    spec = importlib.util.spec_from_file_location("cp_worker", os.path.join(os.path.dirname(__file__), "cp_worker.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_permuting_model_and_plan_changes_nothing(compile_rewrite):
    w = _worker()
    model, inputs = w.build_model(4)
    plan = w.make_plan("ulysses", 4)
    keys = [f"{q}/d8/16x16" for q in ("none", "int8", "fp8", "int8_fp8")]
    cost = CostModel("test", {k: 10.0 for k in keys}, {k: 1.0 for k in keys}, {k: 0.1 for k in keys})
    balance = balance_heads(plan, 2, head_dim=8, dtype=torch.float32, cost=cost,
                            densities={sid: [1.0, 0.0, 0.3, 0.5] if sid.startswith("blocks.0") else [0.4, 1.0, 0.6, 0.2]
                                       for sid in plan.sites})
    orders = balance.orders
    assert any(list(o) != sorted(o) for o in orders.values())   # the balancing did move heads
    permuted = apply_head_order(copy.deepcopy(model), orders)
    with torch.no_grad():
        want, _ = compile_rewrite(model, *inputs, options={"plan": plan})
        got, graphs = compile_rewrite(permuted, *inputs, options={"plan": balance.apply(plan)})
        other, _ = compile_rewrite(permuted, *inputs, options={"plan": plan})   # the plan must follow the heads
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (other[0] - want[0]).abs().max() > 1e-3


def test_apply_head_order_refuses_what_it_cannot_permute():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="not an attention module"):
        apply_head_order(model, {"0": [0]})
    w = _worker()
    wan, _ = w.build_model(4, layers=1)
    with pytest.raises(ConfigError, match="not a permutation"):
        apply_head_order(wan, {"blocks.0.attn1": [0, 0, 1, 2]})
