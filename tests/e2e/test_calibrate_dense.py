"""Sites a calibration keeps dense are in the plan as dense entries ("dense on purpose") with
their reason: strict mode accepts the plan, and the table and the plan say why each site is dense
(issue 12 item 5); a site whose plan is predicted slower than dense stays dense (issue 15 item 3)."""
import pytest
import torch
import torch.nn.functional as F

from vsopt.calibration import SiteErrorBudget, calibrate
from vsopt.core.metrics import relative_l2
from vsopt.core.plan import Plan

from . import test_calibrate as planted

HEADS, D, GRID = planted.HEADS, planted.D, planted.GRID
CONTEXT, CONTEXT_DIM = 5, 8  # text tokens of the cross-attention


class SelfAndCrossAttention(torch.nn.Module):
    """The planted self-attention (heads attend to windows in known orders), then a
    cross-attention from its output to a short context, as in a video DiT block."""

    def __init__(self, masked: bool = False):
        super().__init__()
        self.kv = torch.nn.Linear(CONTEXT_DIM, 2 * HEADS * D)
        self.proj = torch.nn.Linear(HEADS * D, HEADS * D, bias=False)
        torch.nn.init.orthogonal_(self.proj.weight)
        keep = torch.ones(GRID.num_tokens, CONTEXT, dtype=torch.bool)
        keep[:, -1] = False  # the last context token is padding
        self.register_buffer("keep", keep if masked else None)

    def forward(self, x, context):
        B, N, _ = x.shape
        q, k, v = x.view(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        k2, v2 = self.kv(context).view(B, CONTEXT, 2, HEADS, D).permute(2, 0, 3, 1, 4)
        o = o + F.scaled_dot_product_attention(o, k2, v2, attn_mask=self.keep)
        return self.proj(o.transpose(1, 2).reshape(B, N, HEADS * D))


def inputs(seeds=(0, 1, 2)):
    g = torch.Generator().manual_seed(100)
    return [(planted.planted_input(s), torch.randn(1, CONTEXT, CONTEXT_DIM, generator=g)) for s in seeds]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    torch.manual_seed(0)
    model = SelfAndCrossAttention().eval()
    out = tmp_path_factory.mktemp("dense") / "cross.plan.json"
    result = calibrate(model, inputs(), SiteErrorBudget(0.05), options=planted.OPTIONS, out=out, grid=GRID,
                       progress=False)
    return model, out, result


def test_cross_attention_gets_a_dense_entry_with_its_reason(calibrated):
    model, out, result = calibrated
    plan = Plan.load(out)
    (cross,) = result.left_dense  # the cross-attention site
    (self_site,) = [s.site_id for s in result.sites]
    assert cross in plan.sites and plan[cross].is_dense and not plan[self_site].is_dense
    assert (plan[cross].q_len, plan[cross].kv_len) == (GRID.num_tokens, CONTEXT)
    reason = plan.meta["dense_reasons"][cross]
    assert reason == result.left_dense[cross] and "cross-attention" in reason and f"kv_len {CONTEXT}" in reason
    assert self_site not in plan.meta["dense_reasons"]
    assert f"left dense: {cross}: {reason}" in result.table()


def test_strict_mode_accepts_the_calibrated_plan(calibrated):
    """torch.compile(backend="vsopt") in strict mode with the calibrated plan: no site is left
    dense that the plan did not ask for, so no error; the self-attention site really is sparse."""
    model, out, result = calibrated
    x = inputs(seeds=(0,))[0]
    compiled = torch.compile(model, backend="vsopt", options={"plan": str(out), "grid": GRID, "strict": True})
    with torch.no_grad():
        got, want = compiled(*x), model(*x)
    assert 1e-4 < relative_l2(got, want) < 0.05


def test_a_masked_site_gets_a_dense_entry_with_its_reason(tmp_path):
    torch.manual_seed(0)
    model = SelfAndCrossAttention(masked=True).eval()
    result = calibrate(model, inputs(), SiteErrorBudget(0.05), options=planted.OPTIONS, grid=GRID, progress=False)
    (masked,) = result.left_dense
    assert result.plan[masked].is_dense
    assert "attention mask" in result.plan.meta["dense_reasons"][masked]


def test_version_1_plans_without_dense_reasons_still_load(tmp_path):
    """The reasons are plan metadata: a plan written before them (no "dense_reasons") loads, and
    one with them round-trips."""
    import json

    from pathlib import Path

    doc = json.loads((Path(__file__).parents[1] / "baselines" / "plans" / "window-0.3.plan.json").read_text())
    assert doc["version"] == 1 and "dense_reasons" not in doc["meta"]
    Plan.from_json(doc, {})
    path = tmp_path / "r.plan.json"
    sites = dict(Plan.from_json(doc, {}).sites)
    Plan(sites, {"dense_reasons": {next(iter(sites)): "why"}}).save(path)
    assert Plan.load(path).meta["dense_reasons"] == {next(iter(sites)): "why"}
