"""vsopt.benchmark on a tiny untrained reference model: every method builds a valid plan at the asked
density, the sweep records consistent points, the Pareto front and plot are right, the CLI rejects
bad input."""
import json

import pytest
import torch

from vsopt.benchmark import BenchSettings, Method, bench, method_plan, pareto_front, plot_pareto, plan_density, write_json
from vsopt.core.errors import ConfigError
from vsopt.core.ir import AttentionSite, Layout, TokenGrid
from vsopt.core.plan import Quant, Sparsity


def _site(grid, heads=2):
    n = grid.num_tokens
    return AttentionSite("blocks.0.attn1", 0, "sdpa", Layout.BHND, 1, heads, heads, 32, 32, n, n, torch.float32, 0.1,
                         grid=grid)


@pytest.mark.parametrize("method", [Method.WINDOW, Method.RADIAL, Method.TOPK])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_method_plans_hit_their_density(method, density):
    grid = TokenGrid(8, 16, 16)
    site = _site(grid)
    plan, notes = method_plan(method, [site], density, BenchSettings(block=64))
    heads = plan[site.site_id].heads_at(None)
    assert len(heads) == 2 and notes
    got = plan_density(plan, [site])
    if method is Method.TOPK:
        assert heads[0].sparsity is Sparsity.DYNAMIC and got == pytest.approx(density)
    else:
        assert heads[0].sparsity is Sparsity.PATTERN
        assert abs(got - density) < 0.15  # the closest the pattern family reaches on this grid


def test_sage_and_dense_plans():
    site = _site(TokenGrid(2, 8, 8))
    sage, _ = method_plan(Method.SAGE, [site], 1.0, BenchSettings())
    assert {h.quant for h in sage[site.site_id].heads_at(None)} == {Quant.INT8}
    dense, _ = method_plan(Method.DENSE, [site], 1.0, BenchSettings())
    assert dense[site.site_id].is_dense and plan_density(dense, [site]) == 1.0
    with pytest.raises(ConfigError, match="calibration"):
        method_plan(Method.VSOPT, [site], 0.3, BenchSettings())


def test_pareto_front_keeps_only_undominated_points():
    pts = [{"speedup": 1.0, "psnr": 40}, {"speedup": 2.0, "psnr": 30}, {"speedup": 1.5, "psnr": 25},
           {"speedup": 3.0, "psnr": 31}]
    assert [(p["speedup"], p["psnr"]) for p in pareto_front(pts)] == [(1.0, 40), (3.0, 31)]


def test_settings_reject_bad_values():
    with pytest.raises(ConfigError, match="densities"):
        BenchSettings(densities=(0.0,))
    with pytest.raises(ValueError):
        BenchSettings(methods=("nope",))


def test_bench_sweep_on_a_tiny_model(tmp_path):
    from vsopt.models.model import ReferenceConfig, build

    cfg = ReferenceConfig(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, frames=4,
                          height=16, width=16)
    ref = build(cfg).eval()
    settings = BenchSettings(methods=(Method.WINDOW, Method.SAGE), densities=(0.5,), steps=2, block=64)
    result = bench(ref, settings, progress=False)
    points = {p["method"]: p for p in result["points"]}
    assert set(points) == {"window", "sage"}
    assert points["sage"]["density"] == 1.0 and points["sage"]["quant"] == "int8"
    assert points["window"]["density"] < 1.0
    for p in points.values():
        assert p["speedup_source"] == "predicted-cost-model" and p["speedup"] > 0
        assert 0 < p["rel_l2"] < 1 and p["psnr"] > 0 and -1 <= p["ssim"] <= 1
        assert set(p["sites"]) == set(result["model"]["sites"])
    # int8 QK loses far less than dropping half the blocks
    assert points["sage"]["psnr"] > points["window"]["psnr"]
    write_json(result, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["points"][0]["method"] == "window"
    png = plot_pareto(result, tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_methods(capsys):
    from vsopt.cli import main

    assert main(["bench", "--methods", "vsopt,bogus"]) == 1
    assert "bad --methods" in capsys.readouterr().err
    assert main(["bench", "--clip", "4,8"]) == 1
    assert "--clip needs F,H,W" in capsys.readouterr().err


def test_cli_defaults_are_the_settings_defaults(tmp_path):
    # the parser reads BenchSettings' field defaults without running its checks (they import torch)
    from vsopt.benchmark.cli import _check_args
    from vsopt.cli import build_parser

    args = build_parser("bench").parse_args(["bench", "--out", str(tmp_path / "out")])
    settings, _ = _check_args(args)
    assert settings == BenchSettings()


def test_density_of_a_cumulative_mass_head_needs_its_inputs():
    from vsopt.core.dynamic import DynamicMethod, DynamicSpec
    from vsopt.core.plan import HeadPlan, Plan

    site = _site(TokenGrid(4, 8, 8))
    head = HeadPlan(Sparsity.DYNAMIC, block_m=64, block_n=64, dynamic=DynamicSpec(DynamicMethod.CUMULATIVE_MASS, 0.9))
    plan = Plan.uniform([site], head)
    with pytest.raises(ConfigError, match="needs q/k"):
        plan_density(plan, [site])

    class Call:  # tokens of block b are 5 * e_b: each query block attends to its own key block
        scale = 1.0
        q = (torch.eye(32)[torch.arange(256) // 64] * 5).repeat(1, 2, 1, 1)
        k = q.clone()

    got = plan_density(plan, [site], {site.site_id: Call})
    assert got == pytest.approx(0.25)  # the diagonal block of 4: the kept mass is all on it


def test_density_of_a_step_ranged_plan_is_averaged_over_steps():
    from vsopt.core.patterns import LocalWindow
    from vsopt.core.plan import HeadPlan, Plan, SitePlan, StepPlan

    site = _site(TokenGrid(8, 16, 16))
    sparse = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(1, 2, 2), block_m=64, block_n=64)
    d = plan_density(Plan.uniform([site], sparse), [site])
    assert d < 0.5
    # dense at step 0, the window at steps 1 .. 3: (1 + 3 d) / 4 over 4 steps; the default heads are dense
    steps = (StepPlan(0, 1, (HeadPlan(),) * 2), StepPlan(1, None, (sparse,) * 2))
    plan = Plan({site.site_id: SitePlan.for_site(site, HeadPlan(), steps)})
    assert plan_density(plan, [site]) == 1.0
    assert plan_density(plan, [site], steps=4) == pytest.approx((1 + 3 * d) / 4)


def test_vsopt_under_a_time_budget_reaches_the_asked_predicted_speedup():
    from vsopt.models.model import ReferenceConfig, build

    cfg = ReferenceConfig(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, frames=4,
                          height=16, width=16)
    ref = build(cfg).eval()
    settings = BenchSettings(methods=(Method.WINDOW, Method.VSOPT), densities=(0.5,), steps=2, block=64,
                             calibration_steps=2, sensitivity=False, vsopt_speedups=(1.05,), vsopt_match=True)
    result = bench(ref, settings, progress=False)
    window = next(p for p in result["points"] if p["method"] == "window")
    vs = [p for p in result["points"] if p["method"] == "vsopt"]
    assert sorted(p["target_speedup"] for p in vs) == sorted({1.05, round(window["speedup"], 4)})
    for p in vs:
        assert p["target_density"] is None and p["speedup_source"] == "predicted-cost-model"
        assert p["speedup"] >= p["target_speedup"] * 0.99  # static heads: the same time as calibrated
    with pytest.raises(ConfigError, match="vsopt_speedups"):
        BenchSettings(vsopt_speedups=(0.0,))


def test_bench_sweep_runs_the_cluster_method(tmp_path):
    from vsopt.models.model import ReferenceConfig, build

    cfg = ReferenceConfig(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, frames=4,
                          height=16, width=16)
    ref = build(cfg).eval()
    settings = BenchSettings(methods=(Method.CLUSTER,), densities=(0.5,), steps=2, block=64)
    (p,) = bench(ref, settings, progress=False)["points"]
    assert p["method"] == "cluster" and 0 < p["density"] < 1 and p["psnr"] > 0 and p["speedup"] > 0
    assert "top-p" in p["notes"][0]
