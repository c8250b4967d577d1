"""`vsopt bench --timing`: the three GPU timing modes reach BenchSettings, a bad one is refused in
one line, sampling_ms hands torch.compile the options of each (CUDA graphs for dense and plans
alike, warmed up so that no graph is recorded in a timed run), and on the CPU, where the speed is
predicted, the timing is recorded but not used."""
import pytest
import torch

from vsopt.benchmark import BenchSettings, Method, bench
from vsopt.benchmark.settings import TIMINGS


def _tiny():
    from vsopt.models.model import ReferenceConfig, build

    cfg = ReferenceConfig(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, frames=4,
                          height=16, width=16)
    return build(cfg).eval()


@pytest.mark.parametrize("timing", TIMINGS)
def test_timing_option_reaches_the_settings(tmp_path, timing):
    from vsopt.benchmark.cli import _check_args
    from vsopt.cli import build_parser

    args = build_parser("bench").parse_args(["bench", "--timing", timing, "--device", "cpu",
                                             "--out", str(tmp_path / "out")])
    settings, device = _check_args(args)
    assert settings.timing == timing and device == "cpu"
    assert settings == BenchSettings(timing=timing)


def test_a_bad_timing_is_refused_in_one_line(capsys):
    from vsopt.cli import main
    from vsopt.core.errors import ConfigError

    assert main(["bench", "--timing", "graphs"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert "bad --timing: timing must be one of eager, compiled, cudagraphs, got 'graphs'" in err
    with pytest.raises(ConfigError, match="timing must be one of"):
        BenchSettings(timing="reduce-overhead")


@pytest.mark.parametrize("timing, options, warmup", [
    ("compiled", {}, 1),
    ("cudagraphs", {"cudagraphs": True}, 2),
])
def test_sampling_ms_compiles_dense_and_plans_with_the_timings_options(monkeypatch, timing, options, warmup):
    from vsopt.benchmark import sweep
    from vsopt.benchmark.methods import method_plan
    from vsopt.benchmark.scorer import PlanScorer

    assert sweep.CUDAGRAPHS_WARMUP_RUNS == 2  # as `vsopt demo --cudagraphs` warms each graph up
    settings = BenchSettings(methods=(Method.TOPK,), densities=(0.5,), steps=2, timing_iters=1, timing=timing)
    scorer = PlanScorer(_tiny(), settings, progress=False)
    plan, _ = method_plan(Method.TOPK, scorer.sites, 0.5, settings)
    compiled, calls = [], []

    def fake_compile(model, **kwargs):  # records what it was asked; runs the model eagerly
        compiled.append(kwargs)

        def run(*args):
            calls.append(1)
            return model(*args)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    for p in (None, plan):
        calls.clear()
        assert sweep.sampling_ms(scorer, p, settings) > 0
        # every step of the untimed warm-up runs and of the one timed run called the compiled model
        assert len(calls) == settings.steps * (warmup + settings.timing_iters)
    dense, planned = compiled
    assert dense == {"backend": "vsopt", "dynamic": False, "options": options}
    assert planned == {"backend": "vsopt", "dynamic": False, "options": {"plan": plan, **options}}
    assert planned["options"]["plan"] is plan


def test_on_the_cpu_the_timing_is_recorded_and_the_speed_predicted(monkeypatch):
    from vsopt.benchmark import sweep

    def not_on_the_cpu(*args):
        raise AssertionError("sampling_ms called on the CPU")

    monkeypatch.setattr(sweep, "sampling_ms", not_on_the_cpu)
    settings = BenchSettings(methods=(Method.TOPK,), densities=(0.5,), steps=2, timing="cudagraphs")
    result = bench(_tiny(), settings, progress=False)
    assert result["settings"]["timing"] == "cudagraphs"
    assert result["dense_ms"] is None
    (point,) = result["points"]
    assert point["speedup_source"] == "predicted-cost-model" and point["ms"] is None


@pytest.mark.parametrize("timing, reuse_steps, noted", [
    ("cudagraphs", 2, True),    # the replayed graph recomputes the reused mask at every step
    ("cudagraphs", 0, False),   # nothing is reused: the timed plan is the scored one
    ("compiled", 2, False),     # outside CUDA graphs the mask cache runs as scored
])
def test_a_point_timed_with_more_work_than_scored_says_so(timing, reuse_steps, noted):
    from vsopt.benchmark.sweep import timing_notes
    from vsopt.core.dynamic import DynamicMethod, DynamicSpec
    from vsopt.core.ir import AttentionSite, Layout
    from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity

    site = AttentionSite("s", 0, "sdpa", Layout.BHND, 1, 2, 2, 8, 8, 64, 64, torch.float32, 0.35)
    head = HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.5, reuse_steps=reuse_steps))
    plan = Plan({"s": SitePlan.for_site(site, [head, HeadPlan()])})
    notes = timing_notes(plan, BenchSettings(timing=timing))
    assert len(notes) == int(noted)
    if noted:
        assert "recomputed at every step" in notes[0]
    assert timing_notes(None, BenchSettings(timing=timing)) == []
