"""A model whose video tokens are ordered (h, w, f) (TokenGrid.axes "hwf", issue 14 class 7):
calibration, the plan and the lowering treat the model's own order (orders.model_order), not FHW,
as "no permutation". The calibration's model-order candidate lowers with no permute op, a plan in
the model's order costs no permutation in the cost model (and one in FHW does), and the compiled
output matches the reference computed from the model's tokens as they are. Frame-major models are
covered, unchanged, by tests/e2e/test_calibrate.py and tests/core/test_calibrate_search.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vsopt.backend import trace_and_rewrite
from vsopt.calibration import CalibrationOptions, SiteErrorBudget, calibrate
from vsopt.calibration.capture import SiteCall
from vsopt.calibration.choices import HeadChoice, head_plans
from vsopt.calibration.measure import SiteState, build_candidates, measure_errors, measure_mass
from vsopt.calibration.order_choice import site_orders
from vsopt.core import semantics
from vsopt.core.config import VsoptConfig
from vsopt.core.costmodel import CostModel
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder, inverse_permutation, model_order, order_permutation
from vsopt.core.patterns import expand_block_mask
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity

from ..conftest import max_rel_err, op_names

GRID = TokenGrid(3, 4, 6, axes="hwf")          # the model's token i is (h, w, f), f innermost
HEADS, D = 3, 16
ORDERS = [TokenOrder.HWF, TokenOrder.FHW, TokenOrder.WFH]   # head 0 is local in the model's own order
COST = CostModel(gpu="test", launch_us={f"{q}/d{D}/16x16": 5.0 for q in ("none", "int8")},
                 per_block_us={"none/d16/16x16": 0.010, "int8/d16/16x16": 0.007},
                 per_query_block_us={f"{q}/d{D}/16x16": 0.01 for q in ("none", "int8")},
                 permute_us_per_mib=1.0, score_us_per_block=0.001)
OPTIONS = CalibrationOptions(block_m=16, block_n=16, mass_shares=(0.8, 0.95, 0.99), cost_model=COST,
                             quants=(Quant.NONE,), dynamic=False, model_order_candidates=True)


class PlantedAttention(torch.nn.Module):
    """x (B, N, 3*H*D) holds q, k, v per head (tokens in the grid's (h, w, f) order); SDPA, heads
    merged, an orthogonal projection."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(HEADS * D, HEADS * D, bias=False)
        torch.nn.init.orthogonal_(self.proj.weight)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = x.view(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(B, N, -1))


def planted_input(seed: int, width: float = 5.0) -> torch.Tensor:
    """Head h attends to a Gaussian window of `width` tokens of the sequence in ORDERS[h]."""
    g = torch.Generator().manual_seed(seed)
    n, c = GRID.num_tokens, 0.5 / width ** 2
    x = torch.randn(1, n, 3, HEADS, D, generator=g) * 0.05
    for h, o in enumerate(ORDERS):
        pos = inverse_permutation(order_permutation(GRID, o)).float() + 0.3 * torch.rand(n, generator=g)
        x[:, :, 0, h, 0], x[:, :, 0, h, 1] = 2 * c * pos, 1.0
        x[:, :, 1, h, 0], x[:, :, 1, h, 1] = pos, -c * pos ** 2
        x[:, :, 2, h] = torch.randn(1, n, D, generator=g)
    return x.reshape(1, n, 3 * HEADS * D)


def qkv(x):
    B, N, _ = x.shape
    return x.view(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)


def the_site(model, x):
    _, report = trace_and_rewrite(model, (x,), VsoptConfig(grid=GRID))
    (site,) = report.sites
    assert site.grid == GRID and model_order(site.grid) is TokenOrder.HWF
    return site


def reference(x, heads):
    """Exact float64 attention under each head's token mask, built in the model's own order: every
    head here runs in it, so its block mask applies to the model's tokens as they are."""
    q, k, v = (t.double() for t in qkv(x))
    n = GRID.num_tokens
    masks = torch.stack([expand_block_mask(semantics.static_mask(_plan_site(heads), hp), n, n, 16, 16)
                         for hp in heads])
    s = (q @ k.transpose(-1, -2)).masked_fill(~masks, float("-inf"))
    return torch.softmax(s, -1) @ v


def _plan_site(heads) -> SitePlan:
    n = GRID.num_tokens
    return SitePlan("attn", HEADS, n, n, GRID, tuple(heads))


def _state(model, x) -> SiteState:
    site = the_site(model, x)
    state = SiteState(site, OPTIONS, site_orders(site.grid, OPTIONS.orders))
    assert state.orders[0] is TokenOrder.HWF     # the model's own order is tried, first
    q, k, v = qkv(x)
    call = SiteCall(site.site_id, q, k, v, None, 1.0, False, None)
    measure_mass(state, call)
    build_candidates(state)
    measure_errors(state, call)
    return state


def test_orders_are_chosen_against_the_model_order():
    torch.manual_seed(0)
    model, x = PlantedAttention().eval(), planted_input(0)
    state = _state(model, x)
    assert state.head_orders == ORDERS
    # the model-order candidates are labelled with the model's order and masked in it
    own = [c for c in state.candidates if c.model_order]
    assert own and all(c.label.endswith("@hwf") for c in own)


def test_the_model_order_candidate_lowers_without_a_permutation(compile_rewrite):
    torch.manual_seed(0)
    model, x = PlantedAttention().eval(), planted_input(0)
    state = _state(model, x)
    (c,) = [i for i, cand in enumerate(state.candidates) if cand.model_order and cand.label == "mask@0.8@hwf"]
    heads = head_plans(state, [HeadChoice(c, Quant.NONE, 0.0, 0.0, 0.0)] * HEADS)
    assert all(hp.order is TokenOrder.HWF and hp.sparsity is Sparsity.MASK for hp in heads)
    site = state.site
    dens = semantics.head_densities(site, heads)
    assert max(dens) < 0.9                                    # really sparse
    # the cost model charges no permutation for the model's order, and one for FHW
    assert semantics.site_work(site, heads, dens).permuted_mib == 0.0
    fhw = [HeadPlan(Sparsity.MASK, TokenOrder.FHW, mask=hp.mask, block_m=16, block_n=16) for hp in heads]
    assert semantics.site_work(site, fhw, dens).permuted_mib > 0.0
    assert semantics.predicted_us(site, heads, COST, dens) < semantics.predicted_us(site, fhw, COST, dens)

    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    out, graphs = compile_rewrite(model, x, options={"plan": plan, "grid": GRID})
    (gm, report), = graphs
    names = op_names(gm)
    assert site.site_id in report.lowered and "vsopt.block_sparse_attention.default" in names
    assert not any("permute_tokens" in n for n in names)      # no permute_tokens / unpermute_tokens
    want = model.proj(reference(x, heads).float().transpose(1, 2).reshape(1, GRID.num_tokens, -1))
    assert max_rel_err(out, want) <= 1e-5
    with torch.no_grad():
        assert max_rel_err(out, model(x)) > 1e-3              # the masks dropped pairs

    # the same masks in FHW: permuted (the must-not-match case for the graph)
    plan_fhw = Plan({site.site_id: SitePlan.for_site(site, fhw)})
    _, graphs = compile_rewrite(model, x, options={"plan": plan_fhw, "grid": GRID})
    assert "vsopt.permute_tokens.default" in op_names(graphs[0][0])


def test_a_dense_plan_in_the_model_order_stays_dense(compile_rewrite):
    """Plain dense heads in the model's order (what calibration writes for them) are dense on
    purpose: the site is kept as vsopt.attention, no launch, no permutation."""
    torch.manual_seed(0)
    model, x = PlantedAttention().eval(), planted_input(0)
    site = the_site(model, x)
    sp = SitePlan.for_site(site, HeadPlan(order=TokenOrder.HWF, block_m=16, block_n=16))
    assert sp.is_dense
    assert not SitePlan.for_site(site, HeadPlan(Sparsity.SKIP, TokenOrder.HWF, block_m=16, block_n=16)).is_dense
    out, graphs = compile_rewrite(model, x, options={"plan": Plan({site.site_id: sp}), "grid": GRID})
    (gm, report), = graphs
    assert site.site_id in report.kept_dense and "vsopt.block_sparse_attention.default" not in op_names(gm)
    with torch.no_grad():
        assert max_rel_err(out, model(x)) <= 1e-6


def test_calibrated_plan_runs_the_model_order_where_it_is_best(tmp_path):
    """calibrate() end to end: head 0 (local in the model's own order) runs in it with no
    permutation; dense heads are in the model's order; the compiled plan's error is the one
    calibration measured."""
    torch.manual_seed(0)
    model = PlantedAttention().eval()
    inputs = [(planted_input(s),) for s in range(2)]
    out = tmp_path / "hwf.plan.json"
    result = calibrate(model, inputs, SiteErrorBudget(0.05), options=OPTIONS, out=out, grid=GRID, progress=False)
    plan = Plan.load(out)
    (sp,) = plan.sites.values()
    for h, hp in enumerate(sp.heads):
        if hp.sparsity is Sparsity.DENSE:
            assert hp.order is TokenOrder.HWF
        else:
            assert hp.order in (ORDERS[h], TokenOrder.HWF)
    assert sp.heads[0].sparsity is not Sparsity.DENSE and sp.heads[0].order is TokenOrder.HWF
    compiled = torch.compile(model, backend="vsopt", options={"plan": str(out), "grid": GRID})
    from vsopt.core.metrics import relative_l2
    with torch.no_grad():
        err = relative_l2(compiled(*inputs[0]), model(*inputs[0]))
    (site,) = result.sites
    assert err == pytest.approx(site.actual_rel_l2, rel=0.01)
    assert err > 1e-4
