"""vsopt.benchmark.sweep on a tiny untrained reference model: a configuration out of its method's
reach and configurations past the time limit are recorded as not run (the sweep goes on), the
partial result is handed out after every point, and vsopt is calibrated once for all densities."""
import pytest
import torch

from vsopt.benchmark import BenchSettings, Method, bench
from vsopt.benchmark.report import summary_table
from vsopt.core.errors import ConfigError


def _tiny():
    from vsopt.models.model import ReferenceConfig, build

    cfg = ReferenceConfig(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, frames=4,
                          height=16, width=16)
    return build(cfg).eval()


def test_an_unreachable_density_is_recorded_and_the_sweep_goes_on():
    # rettention measures (dense) at steps 0 and 2 of 4: density 0.2 is out of reach, 0.9 is not
    settings = BenchSettings(methods=(Method.RETTENTION, Method.TOPK), densities=(0.2, 0.9), steps=4, renorm_every=2)
    seen = []
    result = bench(_tiny(), settings, progress=False, partial=lambda r: seen.append(len(r["points"])))
    done = {(p["method"], p["target_density"]) for p in result["points"]}
    assert done == {("rettention", 0.9), ("topk", 0.2), ("topk", 0.9)}
    (skipped,) = result["not_run"]
    assert skipped["method"] == "rettention" and skipped["target_density"] == 0.2
    assert "exceed density" in skipped["why"]
    assert seen == [1, 2, 3]  # the partial result after every point
    assert "not run: rettention at 0.2" in summary_table(result)


def test_the_time_limit_stops_starting_configurations():
    settings = BenchSettings(methods=(Method.TOPK, Method.WINDOW), densities=(0.5,), steps=2, time_limit_s=1e-3)
    result = bench(_tiny(), settings, progress=False)
    assert result["points"] == []
    assert [(n["method"], n["why"]) for n in result["not_run"]] == [("topk", "time limit 0.001 s reached"),
                                                                     ("window", "time limit 0.001 s reached")]
    with pytest.raises(ConfigError, match="time_limit_s"):
        BenchSettings(time_limit_s=0)
    with pytest.raises(ConfigError, match="calibration_steps"):
        BenchSettings(calibration_steps=0)


def test_vsopt_is_calibrated_once_for_every_density(monkeypatch):
    import vsopt.calibration as calibration

    calls = []
    real = calibration.calibrate_many

    def counting(*args, **kwargs):
        calls.append([b.density for b in args[2]])
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate_many", counting)
    settings = BenchSettings(methods=(Method.VSOPT,), densities=(0.3, 0.6), steps=2, calibration_steps=2,
                             sensitivity=False, vsopt_warmup=())
    result = bench(_tiny(), settings, progress=False)
    assert calls == [[0.3, 0.6]]
    assert result["not_run"] == []
    by = {p["target_density"]: p for p in result["points"]}
    assert set(by) == {0.3, 0.6}
    # each plan is its own density's (dynamic heads measured on the scored clip, not the calibration one)
    assert abs(by[0.3]["density"] - 0.3) < 0.1 and abs(by[0.6]["density"] - 0.6) < 0.1
    assert by[0.3]["density"] < by[0.6]["density"]


def test_sampling_time_is_measured_for_dense_and_step_ranged_plans():
    from vsopt.benchmark.methods import method_plan
    from vsopt.benchmark.scorer import PlanScorer
    from vsopt.benchmark.sweep import sampling_ms

    settings = BenchSettings(methods=(Method.WARMUP,), densities=(0.6,), steps=2, timing_iters=1)
    scorer = PlanScorer(_tiny(), settings)
    plan, _ = method_plan(Method.WARMUP, scorer.sites, 0.6, settings)   # step 0 dense, step 1 top-k
    assert plan.step_boundaries()
    for p in (None, plan):
        assert sampling_ms(scorer, p, settings) > 0
    with pytest.raises(ConfigError, match="timing"):
        BenchSettings(timing="jit")


def test_past_the_time_limit_vsopt_still_scores_the_densities_it_calibrated(monkeypatch):
    import types

    import vsopt.benchmark.sweep as sweep
    from vsopt.benchmark.scorer import PlanScorer

    # the clock passes the limit the moment the calibration is done
    clock = {"now": 0.0}
    monkeypatch.setattr(sweep, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))

    real = PlanScorer.calibrated_plans

    def calibrated_then_late(self, densities):
        plans = real(self, densities)
        clock["now"] = 100.0
        return plans

    monkeypatch.setattr(PlanScorer, "calibrated_plans", calibrated_then_late)
    settings = BenchSettings(methods=(Method.VSOPT, Method.TOPK), densities=(0.3, 0.6), steps=2, calibration_steps=2,
                             sensitivity=False, vsopt_warmup=(), time_limit_s=50.0)
    result = bench(_tiny(), settings, progress=False)
    assert [(p["method"], p["target_density"]) for p in result["points"]] == [("vsopt", 0.3), ("vsopt", 0.6)]
    assert [(n["method"], n["target_density"]) for n in result["not_run"]] == [("topk", 0.3), ("topk", 0.6)]


@pytest.mark.parametrize("args, message", [
    (["--time-limit", "-1"], "bad --time-limit: time_limit_s must be a finite number of seconds > 0"),
    (["--calibration-steps", "0"], "--calibration-steps 0: must be >= 1"),
    (["--vsopt-top-k", "0,2"], "bad --vsopt-top-k: vsopt_top_k must lie in (0, 1]"),
    (["--timing", "jit"], "bad --timing: timing must be one of eager, compiled, cudagraphs, got 'jit'"),
])
def test_cli_rejects_bad_new_options(capsys, args, message):
    from vsopt.cli import main

    assert main(["bench", *args]) == 1
    assert message in capsys.readouterr().err


def test_plan_options_count_what_each_step_runs():
    from vsopt.benchmark.aggregate import plan_options
    from vsopt.benchmark.methods import method_plan
    from vsopt.core.ir import AttentionSite, Layout, TokenGrid
    from vsopt.core.plan import HeadPlan, Plan, SitePlan

    grid = TokenGrid(4, 16, 16)
    n = grid.num_tokens
    site = AttentionSite("blocks.0.attn1", 0, "sdpa", Layout.BHND, 1, 2, 2, 32, 32, n, n, None, 0.1, grid=grid)
    settings = BenchSettings(steps=4, warmup_steps=1)
    plan, _ = method_plan(Method.WARMUP, [site], 0.5, settings)    # step 0 dense, steps 1-3 top-k
    assert plan_options(plan, [site], 4) == ("of 8 head-steps: dense 2, dynamic 6; pooled remainder 0, renorm 0, "
                                             "residual 0 (refresh 0); dense warm-up 1 step(s)")
    cross = AttentionSite("blocks.0.attn2", 1, "sdpa", Layout.BHND, 1, 2, 2, 32, 32, n, 16, None, 0.1)
    plan = Plan({**plan.sites, cross.site_id: SitePlan.for_site(cross, HeadPlan())})   # a dense cross-attention entry
    assert plan_options(plan, [site, cross], 4).startswith("of 8 head-steps: dense 2, dynamic 6;")  # not counted
    plan, _ = method_plan(Method.RETTENTION_POOLED, [site], 0.5, settings)
    assert plan_options(plan, [site], 4) == ("of 8 head-steps: dynamic 8; pooled remainder 2, renorm 8, "
                                             "residual 0 (refresh 0); dense warm-up 0 step(s)")
    settings = BenchSettings(steps=4, renorm_every=2)
    plan, _ = method_plan(Method.RESIDUAL, [site], 0.8, settings)    # exact at steps 0 and 2
    assert plan_options(plan, [site], 4) == ("of 8 head-steps: dynamic 8; pooled remainder 0, renorm 0, "
                                             "residual 8 (refresh 4); dense warm-up 0 step(s)")


def test_calibration_step_ranges_keep_a_correction_and_its_measuring_step_together():
    from vsopt.benchmark.scorer import calibration_step_ranges
    from vsopt.core.rettention import Phase, Renorm, renorm_phase

    assert calibration_step_ranges(4) == ((0, 1), (1, 2), (2, 3), (3, None))
    assert calibration_step_ranges(1) == ((0, None),)
    assert calibration_step_ranges(4, (3,)) == ((0, 1), (1, None))
    assert calibration_step_ranges(8, (3,)) == ((0, 1), (1, 4), (4, 7), (7, None))
    assert calibration_step_ranges(8, (2, 3)) == calibration_step_ranges(8, (3,))
    assert calibration_step_ranges(1, (3,)) is None
    # the measuring steps are those of one range from step 1 (renorm_phase counts from a range's start)
    spec = Renorm(3)
    for steps in (4, 8, 10):
        ranges = calibration_step_ranges(steps, (3,))
        start = {i: a for a, b in ranges for i in range(a, steps if b is None else b)}
        split = [renorm_phase(spec, i, start[i]) for i in range(1, steps)]
        whole = [renorm_phase(spec, i, 1) for i in range(1, steps)]
        assert split == whole and split[0] is Phase.MEASURE


def test_the_step_model_of_a_plan_is_built_once_for_scoring_and_timing():
    from vsopt.benchmark.methods import method_plan
    from vsopt.benchmark.scorer import PlanScorer

    settings = BenchSettings(methods=(Method.TOPK,), densities=(0.5,), steps=2)
    scorer = PlanScorer(_tiny(), settings)
    plan, _ = method_plan(Method.TOPK, scorer.sites, 0.5, settings)
    other, _ = method_plan(Method.TOPK, scorer.sites, 0.5, settings)
    first = scorer.step_model(plan)
    assert scorer.step_model(plan) is first
    assert scorer.step_model(other) is not first   # an equal but other plan object is built anew
    assert scorer.step_model(None) is not scorer.step_model(other)


def test_vsopt_is_calibrated_on_the_scored_runs_steps_by_default(tmp_path):
    # a 4-step calibration scored on 8 steps ran its last step plan at steps 3-7 (measured at one
    # noise level, priced as one step): the default is now one calibration input and plan per scored step
    import argparse

    from vsopt.benchmark.cli import _check_args, add_arguments
    from vsopt.benchmark.scorer import PlanScorer, calibration_step_ranges

    assert BenchSettings(steps=8).calibration_steps == 8
    assert BenchSettings(steps=8, calibration_steps=4).calibration_steps == 4
    settings = BenchSettings(methods=(Method.VSOPT,), densities=(0.5,), steps=3, sensitivity=False, vsopt_renorm=())
    calls, options = PlanScorer(_tiny(), settings)._calibration(0.5)
    assert [c.step for c in calls] == [0, 1, 2]
    assert options.step_ranges == calibration_step_ranges(3) == ((0, 1), (1, 2), (2, None))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert _check_args(parser.parse_args(["--steps", "6", "--out", str(tmp_path)]))[0].calibration_steps == 6
    assert _check_args(parser.parse_args(["--steps", "6", "--calibration-steps", "2",
                                          "--out", str(tmp_path)]))[0].calibration_steps == 2


def test_vsopt_held_out_calibrates_on_two_sampler_runs():
    from vsopt.benchmark.scorer import PlanScorer

    settings = BenchSettings(methods=(Method.VSOPT,), densities=(0.5,), steps=2, sensitivity=False,
                             vsopt_held_out=True)
    calls, options = PlanScorer(_tiny(), settings)._calibration(0.5)
    assert [c.step for c in calls] == [0, 1, 0, 1] and options.held_out_errors
    assert not torch.equal(calls[0].args[0], calls[2].args[0])  # other noise


def test_vsopt_offers_the_softmax_mass_correction_by_default():
    # with the pooled remainder and an 8-step calibration it gained +0.12 / +1.23 dB at 0.2 / 0.3
    # (docs/BENCH.md, session 8); its step ranges keep each measuring step with its corrections
    from vsopt.benchmark.scorer import PlanScorer

    assert BenchSettings().vsopt_renorm == (3,) and BenchSettings().vsopt_pooled
    settings = BenchSettings(methods=(Method.VSOPT,), densities=(0.5,), steps=5, sensitivity=False)
    _, options = PlanScorer(_tiny(), settings)._calibration(0.5)
    assert options.renorm_every == (3,) and options.pooled_remainder
    assert options.step_ranges == ((0, 1), (1, 4), (4, None))
