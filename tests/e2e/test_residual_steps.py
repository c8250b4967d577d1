"""Residual sharing (DiTFastAttn; Renorm kind "residual") through the lowered graphs and through
torch.compile(backend="vsopt") with the project's sampler: refresh steps run exactly and write the
residual buffer, the steps between add it to their sparse output, and the clip is what semantics
says step by step; calibration offers it and the compiled model runs what the search priced."""
import pytest
import torch

from vsopt.backend import trace_and_rewrite
from vsopt.core import semantics
from vsopt.core.config import VsoptConfig
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.plan import HeadPlan, Plan, SitePlan
from vsopt.core.rettention import RENORM_STATE, Correction, Renorm
from vsopt.models import sampler

from tests.e2e.test_rettention_steps import C, HEADS_OF, _setup, sample_against_the_meaning, sample_with_the_sampler

RESIDUAL = Correction.RESIDUAL


@pytest.mark.parametrize("kind, remainder", [("window", "drop"), ("topk", "drop"), ("window", "pooled"),
                                             ("topk", "pooled")])
def test_lowered_refresh_and_reuse_graphs_compute_the_meaning(kind, remainder):
    grid = TokenGrid(3, 3, 5)   # 45 tokens: ragged blocks
    model, example, site = _setup(grid)
    heads = HEADS_OF[kind](Renorm(every=2, kind=RESIDUAL), remainder)
    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    RENORM_STATE.reset()
    gm_m, _ = trace_and_rewrite(model, example, VsoptConfig(plan=plan.at_step(0), grid=grid))
    gm_c, _ = trace_and_rewrite(model, example, VsoptConfig(plan=plan.at_step(1), grid=grid))
    for gm in (gm_m, gm_c):
        targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert torch.ops.aten._local_scalar_dense.default not in targets   # no host synchronization
        assert torch.ops.vsopt.attention.default not in targets
        names = [n for n, _ in gm.named_buffers()]
        assert any("renorm_resid" in n for n in names) and not any("renorm_rho" in n for n in names)
    bufs = lambda gm: [b.data_ptr() for n, b in gm.named_buffers() if "renorm_resid" in n]  # noqa: E731
    assert bufs(gm_m) == bufs(gm_c)          # one residual buffer, shared by the site's graphs
    x0 = example[0]
    x1 = x0 + 0.3 * torch.randn_like(x0)
    with torch.no_grad():
        assert torch.isnan(gm_c(x1, *example[1:])[0]).all()   # reusing before any refresh: NaN, not silently wrong
        got_m = gm_m(x0, *example[1:])[0]
        got_c = gm_c(x1, *example[1:])[0]
        m_qkv, c_qkv = model.qkv_heads(x0), model.qkv_heads(x1)
        at_c = plan.at_step(1)[site.site_id].heads
        want_c = model.finish(semantics.site_output(site, at_c, *c_qkv, site.scale, renorm_from=m_qkv), x1)[0]
        dense_m, dense_c = model(x0, *example[1:])[0], model(x1, *example[1:])[0]
    torch.testing.assert_close(got_m, dense_m, rtol=1e-5, atol=1e-5)   # a refresh step is exact
    torch.testing.assert_close(got_c, want_c, rtol=1e-5, atol=1e-5)
    plain = tuple(HeadPlan(**{**h.__dict__, "renorm": None}) for h in heads)
    plain_gm, _ = trace_and_rewrite(model, example, VsoptConfig(plan=Plan({site.site_id: SitePlan.for_site(
        site, plain)}), grid=grid))
    with torch.no_grad():
        sparse_c = plain_gm(x1, *example[1:])[0] if kind == "window" else model.finish(
            semantics.site_output(site, plain, *c_qkv, site.scale, masks_from=m_qkv[:2]), x1)[0]
    assert (got_c - sparse_c).abs().max() > 1e-4                         # must NOT match plain sparse
    assert (got_c - dense_c).norm() < (sparse_c - dense_c).norm()         # and it is closer to dense


@pytest.mark.parametrize("every, steps, remainder", [(2, 5, "drop"), (3, 7, "pooled")])
def test_compiled_model_with_the_sampler_refreshes_and_reuses_at_the_planned_steps(every, steps, remainder):
    _, _, got, again, want, dense, sparse = sample_with_the_sampler(Renorm(every=every, kind=RESIDUAL), remainder,
                                                                    steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=1e-6, atol=1e-6)
    assert (got - sparse).abs().max() > 1e-5
    assert (got - dense).norm() < (sparse - dense).norm()


def test_calibration_offers_residual_sharing_and_the_compiled_model_runs_as_it_predicts():
    """calibrate() on recorded sampler steps with residual_every on offer (and pooled remainders):
    every sparse candidate also comes with residual sharing (exact at its refresh steps, priced at
    every block there); under a density budget of 0.8 the search picks one on this model, and the
    compiled model with the sampler runs what the plan means step by step."""
    from vsopt.calibration import CalibrationOptions, DensityBudget, calibrate
    from vsopt.calibration.capture import record_forward_inputs
    from vsopt.core.orders import TokenOrder
    from vsopt.core.plan import Quant

    from tests.core.test_calibrate_search import COST

    grid = TokenGrid(4, 4, 8)
    model, example, site = _setup(grid, gain=2.0, seed=4)
    steps = 5
    shape = (C, grid.frames, grid.height, grid.width)
    with torch.no_grad(), record_forward_inputs(model) as calls:
        sampler.sample(model, example[2], shape, steps=steps, seed=3)
    opts = CalibrationOptions(block_m=16, block_n=16, orders=(TokenOrder.FHW,), patterns=True, mass_shares=(0.5, 0.8),
                              dynamic_values=(), dynamic_top_k=(0.25,), residual_every=(2,), pooled_remainder=True,
                              skip=False, quants=(Quant.NONE,), cost_model=COST)
    result = calibrate(model, calls, DensityBudget(0.8), options=opts, grid=grid, progress=False)
    plan = result.plan
    chosen = list(plan[site.site_id].all_heads())
    assert any(h.renorm == Renorm(2, kind=RESIDUAL) for h in chosen), chosen   # the search buys it here

    got, want = sample_against_the_meaning(model, example, site, plan, grid, steps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_intervals_are_one_line_errors():
    from vsopt.benchmark.settings import BenchSettings
    from vsopt.calibration import CalibrationOptions

    with pytest.raises(ConfigError, match="CalibrationOptions.residual_every: 1 measures at every step"):
        CalibrationOptions(residual_every=(1,))
    with pytest.raises(ConfigError, match="vsopt_residual: intervals must be integers >= 2"):
        BenchSettings(vsopt_residual=(1,))


def test_bench_flags_reach_the_settings(tmp_path):
    import argparse

    from vsopt.benchmark.cli import _check_args, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    settings, _ = _check_args(p.parse_args(["--methods", "vsopt", "--vsopt-residual", "2,3", "--vsopt-probe",
                                            "--device", "cpu", "--out", str(tmp_path / "o")]))
    assert settings.vsopt_residual == (2, 3) and settings.vsopt_probe
    default, _ = _check_args(p.parse_args(["--device", "cpu", "--out", str(tmp_path / "o")]))
    assert default.vsopt_residual == () and not default.vsopt_probe
    with pytest.raises(ConfigError, match="--vsopt-residual"):
        _check_args(p.parse_args(["--vsopt-residual", "1", "--device", "cpu", "--out", str(tmp_path / "o")]))
