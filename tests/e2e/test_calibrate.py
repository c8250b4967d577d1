"""vsopt.calibrate end to end on a small attention model with planted structure: known orders,
budgets met, predictions checked against the plan's actual error, resume, CLI, sampler steps."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import vsopt.calibration.run as cal  # the driver: the resume test patches its run_observing and Checkpoint
from vsopt.calibration import (CalibrationOptions, DensityBudget, QualityFloor, SiteErrorBudget, calibrate, check_plan,
                               reference_model_inputs, site_plan_output)
from vsopt.calibration.capture import record_forward_inputs
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.metrics import relative_l2
from vsopt.core.orders import TokenOrder, inverse_permutation, order_permutation
from vsopt.core.plan import Plan, Quant, Sparsity
from vsopt.core.costmodel import CostModel

GRID = TokenGrid(3, 4, 6)
HEADS, D = 3, 16
ORDERS = [TokenOrder.FHW, TokenOrder.HWF, TokenOrder.WFH]
COST = CostModel(gpu="test", launch_us={f"{q}/d{D}/16x16": 5.0 for q in ("none", "int8", "fp8", "int8_fp8", "int8_int8")},
                 per_block_us={f"{q}/d{D}/16x16": t for q, t in
                               (("none", 0.010), ("int8", 0.007), ("fp8", 0.005), ("int8_fp8", 0.006),
                                ("int8_int8", 0.0065))},
                 per_query_block_us={f"{q}/d{D}/16x16": 0.01 for q in ("none", "int8", "fp8", "int8_fp8", "int8_int8")},
                 permute_us_per_mib=1.0, score_us_per_block=0.001)


class PlantedAttention(torch.nn.Module):
    """Input x (B, N, 3*H*D) holds q, k, v per head; out = SDPA, heads merged, then an orthogonal
    projection (so the model output's relative L2 error equals the attention site's)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(HEADS * D, HEADS * D, bias=False)
        torch.nn.init.orthogonal_(self.proj.weight)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = x.view(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.proj(o.transpose(1, 2).reshape(B, N, HEADS * D))


def planted_input(seed: int, width: float = 5.0, batch: int = 1) -> torch.Tensor:
    """Each head h attends to a Gaussian window of `width` tokens in ORDERS[h]."""
    g = torch.Generator().manual_seed(seed)
    n, c = GRID.num_tokens, 0.5 / width ** 2
    x = torch.randn(batch, n, 3, HEADS, D, generator=g) * 0.05
    for h, o in enumerate(ORDERS):
        pos = inverse_permutation(order_permutation(GRID, o)).float() + 0.3 * torch.rand(n, generator=g)
        x[:, :, 0, h, 0], x[:, :, 0, h, 1] = 2 * c * pos, 1.0
        x[:, :, 1, h, 0], x[:, :, 1, h, 1] = pos, -c * pos ** 2
        x[:, :, 2, h] = torch.randn(batch, n, D, generator=g)
    return x.reshape(batch, n, 3 * HEADS * D)


def model_and_inputs():
    torch.manual_seed(0)
    return PlantedAttention().eval(), [(planted_input(s),) for s in range(3)]


OPTIONS = CalibrationOptions(block_m=16, block_n=16, mass_shares=(0.8, 0.95, 0.99), cost_model=COST,
                             quants=(Quant.NONE, Quant.INT8), dynamic_values=(0.95,))


def _site_output(model, x):
    """The attention output (before the projection) of the planted model, exact, float32."""
    B, N, _ = x.shape
    q, k, v = x.view(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model, inputs = model_and_inputs()
    out = tmp_path_factory.mktemp("plan") / "planted.plan.json"
    result = calibrate(model, inputs, SiteErrorBudget(0.05), options=OPTIONS, out=out, grid=GRID, progress=False)
    return model, inputs, out, result


def test_orders_budget_and_prediction_check(calibrated):
    model, inputs, out, result = calibrated
    plan = Plan.load(out)
    (site_id,) = plan.sites
    heads = plan[site_id].heads
    # every sparse head runs in its planted order; dense heads need no permutation
    for h, hp in enumerate(heads):
        assert hp.order is (ORDERS[h] if hp.sparsity is not Sparsity.DENSE else TokenOrder.FHW)
    assert sum(hp.sparsity is not Sparsity.DENSE for hp in heads) >= 2  # local heads are sparsified
    (site,) = result.sites
    assert site.predicted_rel_l2 <= 0.05
    # the actual error of the saved plan, on a calibration input, within 25% of the prediction
    assert site.actual_rel_l2 == pytest.approx(site.predicted_rel_l2, rel=0.25, abs=2e-3)
    assert site.density < 0.9 and site.predicted_us < site.dense_us
    assert "blocks" not in result.left_dense
    assert not out.with_name(out.name + ".calibration.safetensors").exists()  # checkpoint removed when done
    text = result.table()
    assert site_id in text and "overall density" in text


def test_plan_through_the_backend_gives_the_predicted_error(calibrated):
    """torch.compile(backend="vsopt") with the saved plan: the model output's error against the
    dense model is the error the calibration measured for the plan (same input: within 1%) and
    predicted (within 25%)."""
    model, inputs, out, result = calibrated
    compiled = torch.compile(model, backend="vsopt", options={"plan": str(out), "grid": GRID})
    with torch.no_grad():
        err = relative_l2(compiled(*inputs[0]), model(*inputs[0]))
    (site,) = result.sites
    assert err == pytest.approx(site.actual_rel_l2, rel=0.01)
    assert err == pytest.approx(site.predicted_rel_l2, rel=0.25, abs=2e-3)
    assert err > 1e-4  # the plan really is sparse: dense would differ by float rounding only (~1e-7)


def test_plan_error_on_a_held_out_input_is_as_predicted(calibrated):
    """Held-out input (new seed): the plan's math on the real site inputs, against exact attention."""
    model, _, out, result = calibrated
    plan = Plan.load(out)
    (site_id,) = plan.sites
    x = planted_input(seed=11)
    B, N, _ = x.shape
    q, k, v = x.view(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)
    from vsopt.calibration.capture import SiteCall

    call = SiteCall(site_id, q, k, v, None, 1.0, False, None)
    (site,) = [s for s in result.sites]
    got = site_plan_output(cal_site(model, x), plan[site_id].heads, call)
    err = relative_l2(got, _site_output(model, x))
    assert err == pytest.approx(site.predicted_rel_l2, rel=0.5, abs=5e-3)
    assert err <= 0.05 * 1.5


def cal_site(model, x):
    from vsopt.backend import trace_and_rewrite
    from vsopt.core.config import VsoptConfig

    _, report = trace_and_rewrite(model, (x,), VsoptConfig(grid=GRID))
    (site,) = report.sites
    return site


def test_density_budget(tmp_path):
    model, inputs = model_and_inputs()
    out = tmp_path / "new_folder" / "d.plan.json"  # a folder that does not exist yet is made
    result = calibrate(model, inputs, DensityBudget(0.4), options=OPTIONS, out=out, grid=GRID, progress=False,
                       sampling={"steps": 8, "guidance": 3.0})
    assert result.density <= 0.4 + 1e-6
    plan = Plan.load(out)
    assert all(hp.quant is Quant.NONE for sp in plan.sites.values() for hp in sp.heads)
    # how the inputs were sampled travels with the plan (vsopt demo compares it with its own run)
    assert plan.meta["calibration"]["sampling"] == {"steps": 8, "guidance": 3.0}


def test_speedup_budget_and_calibrate_many(tmp_path, capsys):
    """One measurement, several time budgets: each plan's predicted time (cost model, fixed costs
    included) is within dense / speedup, and a faster plan is never more accurate; the CLI's
    --speedup writes such a plan."""
    from vsopt.calibration import SpeedupBudget, calibrate_many
    from vsopt.cli import main

    model, inputs = model_and_inputs()
    opts = CalibrationOptions(**{**OPTIONS.__dict__, "model_order_candidates": True})
    results = calibrate_many(model, inputs, [SpeedupBudget(1.1), SpeedupBudget(1.5)], options=opts, grid=GRID,
                             progress=False)
    errs = []
    for r, x in zip(results, (1.1, 1.5)):
        pred, dense = sum(s.predicted_us for s in r.sites), sum(s.dense_us for s in r.sites)
        assert pred <= dense / x + 1e-6 and f"{x:g}x" in r.budget
        errs.append(r.sites[0].predicted_rel_l2)
    assert errs[0] <= errs[1] + 1e-12
    with pytest.raises(ConfigError, match="one budget"):
        calibrate_many(model, inputs, [SpeedupBudget(1.1), SpeedupBudget(1.5)], options=opts, out=tmp_path / "x.json")
    cost = tmp_path / "cost.json"
    COST.save(cost)
    out = tmp_path / "speed.plan.json"
    assert main(["calibrate", f"{__name__}:factory", "--speedup", "1.3", "--out", str(out), "--block", "16",
                 "--grid", "3,4,6", "--quant", "none", "--cost-model", str(cost), "--quiet"]) == 0
    assert "predicted attention speedup >= 1.3x" in capsys.readouterr().out and Plan.load(out).sites


_checkpoint_init = cal.Checkpoint.__init__


def _checkpoint_every_input(self, plan_path, fingerprint):
    _checkpoint_init(self, plan_path, fingerprint, every_s=0.0)


def test_interrupted_calibration_resumes(tmp_path, monkeypatch, capsys):
    model, inputs = model_and_inputs()
    out = tmp_path / "r.plan.json"
    real = cal.run_observing
    calls = []

    def flaky(gm, inp, observer):
        calls.append(1)
        if len(calls) == 5:  # 3 inputs measured, 1 error input done, then interrupted
            raise KeyboardInterrupt
        return real(gm, inp, observer)

    monkeypatch.setattr(cal, "run_observing", flaky)
    monkeypatch.setattr(cal.Checkpoint, "__init__", _checkpoint_every_input)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, inputs, SiteErrorBudget(0.05), options=OPTIONS, out=out, grid=GRID, progress=False)
    state_file = tmp_path / "r.plan.json.calibration.safetensors"
    assert state_file.exists() and not out.exists()
    calls.clear()
    resumed = calibrate(model, inputs, SiteErrorBudget(0.05), options=OPTIONS, out=out, grid=GRID, progress=False)
    assert len(calls) == 2 + 1  # the 2 error inputs left, then the check; nothing measured again
    monkeypatch.setattr(cal, "run_observing", real)
    fresh = calibrate(model, inputs, SiteErrorBudget(0.05), options=OPTIONS, out=tmp_path / "f.plan.json", grid=GRID,
                      progress=False)
    assert resumed.sites[0].predicted_rel_l2 == pytest.approx(fresh.sites[0].predicted_rel_l2, rel=1e-9)
    assert resumed.sites[0].choices == fresh.sites[0].choices
    # an unreadable state file, or one from other options, is not reused: the run starts over
    for stale in (b"not a safetensors file", None):
        if stale is None:
            other = CalibrationOptions(**{**OPTIONS.__dict__, "mass_shares": (0.9,)})
            with pytest.raises(KeyboardInterrupt):
                calls.clear()
                monkeypatch.setattr(cal, "run_observing", flaky)
                calibrate(model, inputs, SiteErrorBudget(0.05), options=other, out=out, grid=GRID, progress=False)
            monkeypatch.setattr(cal, "run_observing", real)
        else:
            state_file.write_bytes(stale)
        again = calibrate(model, inputs, SiteErrorBudget(0.05), options=OPTIONS, out=out, grid=GRID, progress=False)
        assert again.sites[0].choices == fresh.sites[0].choices
        assert "starting over" in capsys.readouterr().err or stale is not None


def test_quality_floor(tmp_path):
    model, inputs = model_and_inputs()
    held = (planted_input(seed=7),)
    result = calibrate(model, inputs, QualityFloor(held, 30.0), options=OPTIONS, out=tmp_path / "q.plan.json",
                       grid=GRID, progress=False)
    assert result.quality >= 30.0
    assert result.plan.meta["calibration"]["held_out_score"] == result.quality


def test_recorded_sampler_steps_and_step_ranges(tmp_path):
    """A toy sampler calls the model with keyword arguments; each step range gets its own heads."""
    model, _ = model_and_inputs()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, *, sharpness, return_dict=False):
            return (self.inner(x * sharpness),)

    w = Wrapper().eval()
    with record_forward_inputs(w) as recorded:
        x = planted_input(seed=5)
        for step in range(4):  # early steps: diffuse attention; late steps: sharp
            w(x, sharpness=torch.tensor(0.3 + 0.25 * step), return_dict=False)
    assert [c.step for c in recorded] == [0, 1, 2, 3] and "sharpness" in recorded[0].kwargs
    opts = CalibrationOptions(**{**OPTIONS.__dict__, "step_ranges": ((0, 2), (2, None))})
    result = calibrate(w, recorded, SiteErrorBudget(0.05), options=opts, out=tmp_path / "s.plan.json", grid=GRID,
                       progress=False)
    plan = Plan.load(tmp_path / "s.plan.json")
    (sp,) = plan.sites.values()
    assert [(s.start, s.stop) for s in sp.steps] == [(0, 2), (2, None)]
    early, late = sorted(result.sites, key=lambda s: s.steps[0])
    assert early.density > late.density  # diffuse early attention needs more blocks


def factory():
    model, inputs = model_and_inputs()
    return model, inputs


def test_cli(tmp_path, capsys):
    from vsopt.cli import main

    cost = tmp_path / "cost.json"
    COST.save(cost)
    out = tmp_path / "cli.plan.json"
    report = tmp_path / "report.json"
    rc = main(["calibrate", f"{__name__}:factory", "--max-error", "0.05", "--out", str(out), "--block", "16",
               "--grid", "3,4,6", "--quant", "none,int8", "--cost-model", str(cost), "--report", str(report),
               "--no-dynamic", "--quiet", "--check"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "overall density" in printed and str(out) in printed
    assert "plan check on the first input: lowered_rel_l2" in printed
    check = json.loads(report.read_text())["plan_check"]
    assert check["lowered_rel_l2"] <= 0.05 and check["compiled_rel_l2"] == pytest.approx(check["lowered_rel_l2"], rel=1e-3)
    assert Plan.load(out).sites and json.loads(report.read_text())["sites"][0]["predicted_rel_l2"] <= 0.05
    rc = main(["calibrate", "no_such_module:factory", "--max-error", "0.05", "--out", str(out)])
    assert rc == 1
    assert "cannot import 'no_such_module'" in capsys.readouterr().err
    for bad, message in ((["--grid", "3,x,6"], "--grid '3,x,6'"), (["--quant", "int4"], "--quant")):
        assert main(["calibrate", f"{__name__}:factory", "--max-error", "0.05", "--out", str(out), *bad]) == 1
        assert message in capsys.readouterr().err


def test_diffusers_wan_over_sampler_steps(tmp_path):
    """A small diffusers Wan (the reference model's architecture, random weights) calibrated on its
    inputs over sampler steps (keyword inputs): plan keyed by the model's own site ids, and the
    plan really applied by the lowered graph."""
    pytest.importorskip("diffusers")
    from vsopt.models import model as model_lib

    config = model_lib.ReferenceConfig(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64,
                                       frames=4, height=8, width=8)
    ref = model_lib.build(config).eval()
    calls = reference_model_inputs(ref, clips=1, steps=2)
    assert [c.step for c in calls] == [0, 1] and calls[0].kwargs == {"return_dict": False}
    cost = CostModel(gpu="test", launch_us={"none/d32/16x16": 5.0}, per_block_us={"none/d32/16x16": 0.01},
                     per_query_block_us={"none/d32/16x16": 0.01})
    opts = CalibrationOptions(block_m=16, block_n=16, cost_model=cost, quants=(Quant.NONE,), patterns=False,
                              dynamic=False, mass_shares=(0.9, 0.99))
    out = tmp_path / "wan.plan.json"
    result = calibrate(ref.transformer, calls, SiteErrorBudget(0.3), options=opts, out=out, progress=False)
    assert [s.site_id for s in result.sites] == ["blocks.0.attn1"]
    assert "blocks.0.attn2" in result.left_dense  # cross-attention
    assert result.sites[0].density < 1.0
    # (torch.compile of this model takes a minute on CPU: the planted model's tests cover it)
    check = check_plan(ref.transformer, calls[0], out, compile=False)
    assert check["lowered_rel_l2"] > 1e-4  # the sparse plan was applied, not silently dropped


def test_vsopt_calibrate_is_callable_after_the_module_is_imported(tmp_path):
    import vsopt
    import vsopt.calibration  # noqa: F401  (the implementation's package: vsopt.calibrate stays the function)

    model, inputs = model_and_inputs()
    result = vsopt.calibrate(model, inputs[:1], DensityBudget(0.5), options=OPTIONS, grid=GRID, progress=False)
    assert result.density <= 0.5 + 1e-6
