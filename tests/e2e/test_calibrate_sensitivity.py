"""`vsopt calibrate --reference --sensitivity`: the measured output-sensitivity weights reach the
density search and the plan's meta; misuse is one line naming the flag."""
import json

import pytest

from vsopt.calibration import run as cal_run
from vsopt.cli import main

from tests.e2e.test_calibrate_cli import factory  # noqa: F401 - the fixture


def test_reference_sensitivity_weights_reach_the_search(tmp_path, monkeypatch):
    """A tiny run (128 tokens, 3 steps, CPU, guidance 2): the search gets one weight per
    (site, step range), measured (not all alike), and the plan records them per site and step."""
    monkeypatch.chdir(tmp_path)
    seen = []
    decide = cal_run.decide_with_warmup

    def spy(states, cost, budget, weights, *rest):
        seen.append(weights)
        return decide(states, cost, budget, weights, *rest)

    monkeypatch.setattr(cal_run, "decide_with_warmup", spy)
    out = tmp_path / "s.plan.json"
    assert main(["calibrate", "--reference", "--size", "2x16x16", "--steps", "3", "--clips", "1", "--guidance", "2",
                 "--density", "0.5", "--sensitivity", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    (weights,) = seen
    assert weights is not None and len(weights) >= 2
    assert all(w > 0 for w in weights.values()) and len({round(w, 12) for w in weights.values()}) > 1, weights
    recorded = json.loads(out.read_text())["meta"]["calibration"]["options"]["error_weights"]
    assert {sid for sid, _ in weights} == set(recorded)
    assert all(set(per_step) == {"0", "1", "2"} for per_step in recorded.values())
    # one step range (none given): the search's weight is the mean over the 3 steps
    for (sid, _), w in weights.items():
        assert w == pytest.approx(sum(recorded[sid].values()) / 3, rel=1e-9)


BAD = [
    (["./m.py:make", "--density", "0.5", "--sensitivity"], "--sensitivity: needs --reference"),
    (["./m.py:make", "--max-error", "0.1", "--sensitivity"], "--sensitivity: needs --reference"),
    (["--reference", "--max-error", "0.1", "--sensitivity"], "--sensitivity: a per-site budget"),
    (["--reference", "--min-psnr", "30", "--sensitivity"], "--sensitivity: a per-site budget"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_sensitivity_misuse_is_one_line(factory, capsys, argv, message):  # noqa: F811
    rc = main(["calibrate", *argv, "--out", "m.plan.json", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.strip().count("\n") == 0, err
    assert not (factory / "factory_called").exists()


def test_the_bench_measures_the_same_weights_through_the_shared_helper():
    """The bench's vsopt method (sensitivity on, its default) gets sampler_sensitivity's weights for
    every site it calibrates and each calibration step, keyed by its own (Velocity) site ids."""
    from vsopt.benchmark.scorer import PlanScorer
    from vsopt.benchmark.settings import BenchSettings, Method
    from vsopt.calibration.sensitivity import sampler_sensitivity
    from vsopt.models.model import ReferenceConfig, build

    cfg = ReferenceConfig(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, frames=4,
                          height=16, width=16)
    s = BenchSettings(methods=(Method.VSOPT,), densities=(0.5,), steps=2, calibration_steps=2)
    scorer = PlanScorer(build(cfg).eval(), s)
    calls, options = scorer._calibration(0.5)
    w = options.error_weights
    assert list(w) == ["transformer.blocks.0.attn1"] and set(w["transformer.blocks.0.attn1"]) == {0, 1}
    assert all(v > 0 for v in w["transformer.blocks.0.attn1"].values())
    assert w == sampler_sensitivity(scorer.velocity, [c.args for c in calls], s.block)
    assert scorer.calibrated_plan(0.5).sites
