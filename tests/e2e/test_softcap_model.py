"""A hand-written soft-capped attention model (scores -> cap * tanh(scores / cap) before the softmax,
in several spellings): found by the softmax rule with its cap, rewritten to vsopt.attention with
the cap (compile equals eager without a plan), lowered with a plan to block_sparse_attention with
the cap (equals the capped reference under the plan's masks), strict mode passes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vsopt
from vsopt.core.ir import TokenGrid
from vsopt.core.patterns import LocalWindow, expand_block_mask
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity

from ..conftest import max_rel_err, op_names

GRID = TokenGrid(4, 4, 5)            # 80 tokens in 16-token blocks
HEADS, DIM, CAP = 2, 32, 3.0
SPELLINGS = ("div", "mul_inverse", "gemma", "scaled_q", "einsum")


class CappedAttention(nn.Module):
    def __init__(self, spelling: str, cap: float = CAP):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.spelling, self.cap, self.scale = spelling, cap, (DIM // HEADS) ** -0.5
        self.token_mask = None     # set by the test's reference only: a (H, N, N) keep mask

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        c = self.cap
        if self.spelling == "div":
            s = c * torch.tanh((q @ k.transpose(-2, -1)) * self.scale / c)
        elif self.spelling == "mul_inverse":
            s = torch.tanh((q @ k.transpose(-2, -1)) * self.scale * (1.0 / c)) * c
        elif self.spelling == "gemma":                      # Gemma 2's eager attention
            s = torch.matmul(q, k.transpose(2, 3)) * self.scale
            s = s / c
            s = torch.tanh(s)
            s = s * c
        elif self.spelling == "scaled_q":
            s = ((q * self.scale) @ k.transpose(-2, -1)).div(c).tanh().mul(c)
        else:
            s = c * torch.tanh(torch.einsum("bhqd,bhkd->bhqk", q, k) * (self.scale / c))
        if self.token_mask is not None:
            s = s.masked_fill(~self.token_mask, float("-inf"))
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        return self.proj((p @ v).transpose(1, 2).reshape(B, N, C))


class Model(nn.Module):
    def __init__(self, spelling: str, cap: float = CAP):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": CappedAttention(spelling, cap)}) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["attn"](x)
        return x


def _x():
    return 3.0 * torch.randn(1, GRID.num_tokens, DIM, generator=torch.Generator().manual_seed(1))


def _plan(quant="none") -> Plan:
    n = GRID.num_tokens
    head = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16, quant=quant)
    return Plan({f"blocks.{i}.attn": SitePlan(f"blocks.{i}.attn", HEADS, n, n, GRID, (head,) * HEADS)
                 for i in range(2)})


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_found_with_its_cap_and_compiled_equal_to_eager(spelling, compile_rewrite):
    model, x = Model(spelling).eval(), _x()
    with torch.no_grad():
        want = model(x)
        report = vsopt.inspect(model, x, options={"grid": GRID, "strict": True})
        assert [s.site_id for s in report.sites] == ["blocks.0.attn", "blocks.1.attn"] and report.skipped == []
        assert all(s.rule == "softmax" and s.softcap == pytest.approx(CAP) for s in report.sites)
        assert all(s.scale == pytest.approx((DIM // HEADS) ** -0.5) for s in report.sites)
        out, graphs = compile_rewrite(model, x, options={"grid": GRID, "strict": True})
    (gm, _), = graphs
    names = op_names(gm)
    assert "aten.tanh.default" not in names and not [o for o in names if "softmax" in o]
    atts = [n for n in gm.graph.nodes if n.target is torch.ops.vsopt.attention.default]
    assert len(atts) == 2 and all(n.args[6] == pytest.approx(CAP) for n in atts)
    assert max_rel_err(out, want) <= 1e-5


def test_the_cap_matters():
    """Must NOT match: the same model without the cap (a huge one) gives another output."""
    x = _x()
    with torch.no_grad():
        assert max_rel_err(Model("div", cap=1e6)(x), Model("div")(x)) > 1e-2


def _reference_under_plan(model, x, plan):
    """The eager model with each site's planned block mask applied after the cap."""
    n = GRID.num_tokens
    for i, b in enumerate(model.blocks):
        hp = plan.sites[f"blocks.{i}.attn"].heads[0]
        bm = hp.block_mask(n, n, GRID)
        b["attn"].token_mask = expand_block_mask(bm, n, n, hp.block_m, hp.block_n)[None]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for b in model.blocks:
            b["attn"].token_mask = None


@pytest.mark.parametrize("spelling", ["div", "gemma"])
def test_lowered_with_a_plan_keeps_the_cap_and_matches_the_reference(spelling):
    model, x, plan = Model(spelling).eval(), _x(), _plan()
    want = _reference_under_plan(model, x, plan)
    dense = model(x).detach()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="vsopt", options={"plan": plan, "grid": GRID, "strict": True})(x)
    report = vsopt.last_report()
    assert report.lowered == ["blocks.0.attn", "blocks.1.attn"] and report.dense_sites() == []
    assert max_rel_err(out, want) <= 1e-5
    assert max_rel_err(out, dense) > 1e-3            # the plan's sparsity did apply


def test_a_tanh_before_a_mask_only_is_a_cap_and_other_tanh_uses_are_left_alone():
    """tanh of masked scores (tanh(-inf) = -1 would un-mask keys) is not a soft cap: left alone, with
    the reason, and the compiled model still equals eager."""
    class MaskThenTanh(nn.Module):
        def forward(self, q, k, v, keep):
            s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~keep, float("-inf"))
            return torch.softmax(CAP * torch.tanh(s / CAP), -1) @ v

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 24, 8, generator=g) for _ in range(3))
    keep = torch.rand(1, 1, 24, 24, generator=g) > 0.3
    model = MaskThenTanh()
    report = vsopt.inspect(model, q, k, v, keep)
    assert report.sites == [] and len(report.skipped) == 1
    assert "not a soft cap" in report.skipped[0].reason
    torch._dynamo.reset()
    out = torch.compile(model, backend="vsopt")(q, k, v, keep)
    assert max_rel_err(out, model(q, k, v, keep)) <= 1e-6


@pytest.mark.parametrize("quant", ["none", "int8_fp8"])
def test_the_lowered_launch_carries_the_cap(quant):
    from vsopt.backend import trace_and_rewrite
    from vsopt.core.config import VsoptConfig

    config = VsoptConfig.from_options({"plan": _plan(quant), "grid": GRID, "strict": True})
    with torch.no_grad():
        gm, _ = trace_and_rewrite(Model("gemma").eval(), (_x(),), config)
    launches = [n for n in gm.graph.nodes if n.target is torch.ops.vsopt.block_sparse_attention.default]
    assert len(launches) == 2
    assert all(n.args[8] == quant and n.args[9] == pytest.approx(CAP) for n in launches)
