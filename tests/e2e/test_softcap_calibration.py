"""Calibration of a soft-capped attention (issue 14 class 5): the site's logits are capped,
s -> cap * tanh(s / cap), before the softmax, and calibration measures every candidate, the exact
reference and its order masses with the cap, so the plan's predicted and measured errors are the
ones the lowered plan really has. A must-not-match: the same plan measured without the cap has a
clearly different error (an uncapped calibration would be dishonest here)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vsopt.backend import trace_and_rewrite
from vsopt.calibration import CalibrationOptions, SiteErrorBudget, calibrate
from vsopt.calibration.capture import SiteCall
from vsopt.calibration.measure import exact_attention
from vsopt.core import semantics
from vsopt.core.config import VsoptConfig
from vsopt.core.costmodel import CostModel
from vsopt.core.ir import TokenGrid
from vsopt.core.metrics import block_attention_mass, relative_l2
from vsopt.core.orders import TokenOrder, inverse_permutation, order_permutation
from vsopt.core.plan import Plan, Quant, Sparsity

from ..conftest import op_names

GRID = TokenGrid(3, 4, 6)
HEADS, D, CAP = 2, 16, 5.0
ORDERS = [TokenOrder.FHW, TokenOrder.HWF]
COST = CostModel(gpu="test", launch_us={f"{q}/d{D}/16x16": 5.0 for q in ("none", "int8")},
                 per_block_us={"none/d16/16x16": 0.010, "int8/d16/16x16": 0.007},
                 per_query_block_us={f"{q}/d{D}/16x16": 0.01 for q in ("none", "int8")},
                 permute_us_per_mib=1.0, score_us_per_block=0.001)
OPTIONS = CalibrationOptions(block_m=16, block_n=16, mass_shares=(0.7, 0.9, 0.97), cost_model=COST,
                             quants=(Quant.NONE, Quant.INT8), dynamic=False)


class CappedPlanted(torch.nn.Module):
    """x (B, N, 3*H*D) holds q, k, v per head; soft-capped attention written out by hand, heads
    merged, an orthogonal projection (the model's relative error is the site's)."""

    def __init__(self, cap: float = CAP):
        super().__init__()
        self.cap = cap
        self.proj = torch.nn.Linear(HEADS * D, HEADS * D, bias=False)
        torch.nn.init.orthogonal_(self.proj.weight)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = x.view(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)
        s = self.cap * torch.tanh((q @ k.transpose(-2, -1)) / self.cap)
        return self.proj((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, N, -1))


def planted_input(seed: int, width: float = 4.0) -> torch.Tensor:
    """Head h's logits are -(p_i - p_j)^2 / (2 width^2) over positions p in ORDERS[h] (<= 0): local
    before the cap; the cap (floor -CAP) leaves every far key a share, so the cap matters."""
    g = torch.Generator().manual_seed(seed)
    n, c = GRID.num_tokens, 0.5 / width ** 2
    x = torch.randn(1, n, 3, HEADS, D, generator=g) * 0.02
    for h, o in enumerate(ORDERS):
        pos = inverse_permutation(order_permutation(GRID, o)).float() + 0.3 * torch.rand(n, generator=g)
        x[:, :, 0, h, 0], x[:, :, 0, h, 1], x[:, :, 0, h, 2] = 2 * c * pos, 1.0, -c * pos ** 2
        x[:, :, 1, h, 0], x[:, :, 1, h, 1], x[:, :, 1, h, 2] = pos, -c * pos ** 2, 1.0
        x[:, :, 2, h] = torch.randn(1, n, D, generator=g)
    return x.reshape(1, n, 3 * HEADS * D)


def _call(x, softcap):
    B, N, _ = x.shape
    q, k, v = x.view(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)
    return SiteCall("s", q, k, v, None, 1.0, False, None, softcap)


def test_the_reference_and_the_masses_apply_the_cap():
    x = planted_input(0)
    call, plain = _call(x, CAP), _call(x, 0.0)
    s = CAP * torch.tanh(call.q.double() @ call.k.double().transpose(-1, -2) / CAP)
    want = torch.softmax(s, -1) @ call.v.double()
    torch.testing.assert_close(exact_attention(call).double(), want, rtol=1e-4, atol=3e-5)  # float32
    assert relative_l2(exact_attention(plain), want) > 0.05           # the cap changes the attention
    mass = block_attention_mass(call.q, call.k, 1.0, 16, 16, softcap=CAP).double()
    p = torch.softmax(s, -1)
    want_mass = torch.stack([p[..., i * 16:(i + 1) * 16].sum(-1) for i in range(5)], -1)  # (B, H, N, KB)
    want_mass = torch.stack([want_mass[:, :, r * 16:(r + 1) * 16].mean(2) for r in range(5)], 2)
    torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    torch.manual_seed(0)
    model = CappedPlanted().eval()
    inputs = [(planted_input(s),) for s in range(2)]
    out = tmp_path_factory.mktemp("cap") / "cap.plan.json"
    result = calibrate(model, inputs, SiteErrorBudget(0.08), options=OPTIONS, out=out, grid=GRID, progress=False)
    return model, inputs, out, result


def test_the_site_is_found_with_its_cap(calibrated):
    model, inputs, _, _ = calibrated
    _, report = trace_and_rewrite(model, inputs[0], VsoptConfig(grid=GRID))
    (site,) = report.sites
    assert site.softcap == pytest.approx(CAP) and site.scale == pytest.approx(1.0)


def test_calibrated_error_with_the_cap_is_the_lowered_plans(calibrated, compile_rewrite):
    model, inputs, out, result = calibrated
    plan = Plan.load(out)
    (sp,) = plan.sites.values()
    assert any(hp.sparsity is not Sparsity.DENSE for hp in sp.heads)   # a sparse plan
    (site,) = result.sites
    # the lowered plan, run: the block-sparse kernel applies the cap (CPU: its reference)
    got, graphs = compile_rewrite(model, *inputs[0], options={"plan": plan, "grid": GRID})
    (gm, report), = graphs
    bsa = [n for n in gm.graph.nodes if n.op == "call_function" and "block_sparse_attention" in str(n.target)]
    assert bsa and all(float(n.args[-1]) == pytest.approx(CAP) for n in bsa)
    with torch.no_grad():
        err = relative_l2(got, model(*inputs[0]))
    assert err == pytest.approx(site.actual_rel_l2, rel=0.01)
    assert err == pytest.approx(site.predicted_rel_l2, rel=0.25, abs=2e-3)
    assert err > 1e-3                                                    # really sparse
    # must not match: measured without the cap, the same plan's error is clearly different
    call = _call(inputs[0][0], 0.0)
    (found,) = trace_and_rewrite(model, inputs[0], VsoptConfig(grid=GRID))[1].sites
    uncapped = relative_l2(semantics.site_output(found, sp.heads, call.q, call.k, call.v, 1.0), exact_attention(call))
    assert abs(uncapped - err) > 0.3 * err
    assert "vsopt.block_sparse_attention.default" in op_names(gm)
