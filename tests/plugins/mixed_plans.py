"""A plan that mixes what a plan can say, for the export tests: per site, heads with a static
pattern, a calibrated-style mask, skip, dense, a dynamic rule (top-k, cumulative mass), several
token orders and every quant mode, rotating across sites so a model with two heads per site still
sees them all. Cross-attention sites (no grid, q_len != kv_len) get masks in the model's order."""
from __future__ import annotations

import torch

import vsopt
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.patterns import LocalWindow, num_blocks
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity


def _self_heads(block: int, grid, qb: int, kb: int) -> list[HeadPlan]:
    g = torch.Generator().manual_seed(qb * 31 + kb)
    mask = torch.rand(qb, kb, generator=g) < 0.5
    mask |= torch.eye(qb, kb, dtype=torch.bool)
    b = dict(block_m=block, block_n=block)
    return [
        HeadPlan(Sparsity.PATTERN, order="hwf", quant="int8", pattern=LocalWindow(0, 1, 1), **b),
        HeadPlan(Sparsity.MASK, order="wfh", quant="fp8", mask=mask, **b),
        HeadPlan(Sparsity.SKIP, **b),
        HeadPlan(Sparsity.DYNAMIC, order="fwh", quant="int8_fp8", dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.5), **b),
        HeadPlan(Sparsity.DENSE, order="whf", **b),
        HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(DynamicMethod.CUMULATIVE_MASS, 0.9, reuse_steps=2), **b),
    ]


def _cross_heads(block: int, qb: int, kb: int) -> list[HeadPlan]:
    mask = torch.zeros(qb, kb, dtype=torch.bool)
    mask[::2] = True
    b = dict(block_m=block, block_n=block)
    return [HeadPlan(Sparsity.MASK, quant="int8", mask=mask, **b), HeadPlan(Sparsity.DENSE, **b),
            HeadPlan(Sparsity.SKIP, **b)]


def mixed_plan(model: torch.nn.Module, inputs: tuple, block: int = 16) -> Plan:
    """The mixed plan for every site of model on inputs."""
    report = vsopt.inspect(model, *inputs)
    sites = {}
    for i, s in enumerate(report.sites):
        qb, kb = num_blocks(s.q_len, block), num_blocks(s.kv_len, block)
        if s.grid is not None and s.grid.num_tokens == s.q_len == s.kv_len:
            pool = _self_heads(block, s.grid, qb, kb)
        else:
            pool = _cross_heads(block, qb, kb)
        heads = [pool[(i * s.heads + h) % len(pool)] for h in range(s.heads)]
        sites[s.site_id] = SitePlan.for_site(s, heads)
    return Plan(sites, {"made_by": "tests/plugins/mixed_plans.py"})
