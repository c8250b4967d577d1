"""`vsopt calibrate --held-out-errors / --clusters / --sensitivity-probe` (the bench's
--vsopt-held-out, --vsopt-clusters, --vsopt-probe): each reaches CalibrationOptions and the plan's
meta.calibration.options; misuse is one line naming the flag."""
import json

import pytest

from vsopt.calibration import run as cal_run
from vsopt.calibration import sensitivity
from vsopt.cli import main

from tests.e2e.test_calibrate_cli import factory  # noqa: F401 - the fixture


def _spy(monkeypatch, name, seen):
    """Record what calibrate's pass function `name` sees (the state's candidates, or the call)."""
    real = getattr(cal_run, name)

    def spy(state, *rest):
        out = real(state, *rest)
        seen.append(state if name == "build_candidates" else rest[0])
        return out

    monkeypatch.setattr(cal_run, name, spy)


def test_held_out_errors_split_a_factorys_inputs(factory, monkeypatch):  # noqa: F811
    """Two inputs, one step range: block mass on the first, candidate errors on the second."""
    mass, errors = [], []
    _spy(monkeypatch, "measure_mass", mass)
    _spy(monkeypatch, "measure_errors", errors)
    out = factory / "h.plan.json"
    assert main(["calibrate", "./m.py:make", "--max-error", "0.1", "--held-out-errors", "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads(out.read_text())["meta"]["calibration"]["options"]["held_out_errors"] is True
    assert len(mass) == len(errors) == 1 and not (mass[0].q == errors[0].q).all()


def test_clusters_are_offered_at_each_top_p(factory, monkeypatch):  # noqa: F811
    """128 tokens without a grid, 64-token blocks: 2 query and 2 key clusters per head (one per
    kernel block), one candidate per top-p, refreshed every 2 steps; the plan records the specs."""
    states = []
    _spy(monkeypatch, "build_candidates", states)
    out = factory / "c.plan.json"
    assert main(["calibrate", "./m.py:make", "--max-error", "0.1", "--clusters", "0.5,0.9", "--cluster-refresh", "2",
                 "--out", str(out), "--quiet"]) == 0
    (state,) = states
    assert [c.label for c in state.candidates if c.cluster is not None] == ["cluster(2x2,p0.5,every2)",
                                                                            "cluster(2x2,p0.9,every2)"]
    recorded = json.loads(out.read_text())["meta"]["calibration"]["options"]["clusters"]
    assert [(c["q_clusters"], c["k_clusters"], c["top_p"], c["refresh"]) for c in recorded] == [
        (2, 2, 0.5, 2), (2, 2, 0.9, 2)]


def test_reference_held_out_run_and_pooled_probe(tmp_path, monkeypatch):
    """--reference --held-out-errors records a second sampler run (other clips) for pass 2;
    --sensitivity-probe pooled measures the weights on the first run with a pooled top-k probe at
    the density budget; both are in the plan's meta."""
    monkeypatch.chdir(tmp_path)
    probed, inputs = [], []
    real_sensitivity, real_calibrate = sensitivity.sampler_sensitivity, cal_run.calibrate

    def sampler_sensitivity(model, calls, block, probe_head=None, **kw):
        probed.append((len(calls), probe_head))
        return real_sensitivity(model, calls, block, probe_head, **kw)

    def calibrate(model, calls, budget, **kw):
        inputs.extend(calls)
        return real_calibrate(model, calls, budget, **kw)

    monkeypatch.setattr(sensitivity, "sampler_sensitivity", sampler_sensitivity)
    monkeypatch.setattr(cal_run, "calibrate", calibrate)
    out = tmp_path / "r.plan.json"
    assert main(["calibrate", "--reference", "--size", "2x16x16", "--steps", "2", "--clips", "1", "--density", "0.4",
                 "--held-out-errors", "--sensitivity", "--sensitivity-probe", "pooled", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    assert [c.step for c in inputs] == [0, 1, 0, 1] and [c.index for c in inputs] == [0, 1, 2, 3]
    assert not (inputs[0].args[0] == inputs[2].args[0]).all()  # the second run's own noise
    ((n, head),) = probed
    assert n == 2 and head.remainder.value == "pooled" and head.dynamic.value == pytest.approx(0.4)
    options = json.loads(out.read_text())["meta"]["calibration"]["options"]
    assert options["held_out_errors"] is True and options["error_weights_probe"] == "pooled top-k 0.4"
    assert set(next(iter(options["error_weights"].values()))) == {"0", "1"}


BAD = [
    (["--max-error", "0.1", "--sensitivity-probe", "pooled"], "--sensitivity-probe: only with --sensitivity"),
    (["--max-error", "0.1", "--clusters", "1.5"], "--clusters '1.5': top-p values must lie in (0, 1]"),
    (["--max-error", "0.1", "--clusters", "x"], "--clusters 'x': expected comma-separated floats"),
    (["--max-error", "0.1", "--cluster-refresh", "2"], "--cluster-refresh: only with --clusters"),
    (["--max-error", "0.1", "--clusters", "0.9", "--cluster-refresh", "0"], "--cluster-refresh 0: must be"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_misuse_is_one_line_before_the_model_is_built(factory, capsys, argv, message):  # noqa: F811
    rc = main(["calibrate", "./m.py:make", *argv, "--out", "m.plan.json"])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.strip().count("\n") == 0, err
    assert not (factory / "factory_called").exists()


@pytest.mark.parametrize("extra, where", [(["--min-psnr", "20"], "the calibration has 1"),
                                          (["--max-error", "0.1", "--step-ranges", "0:1,1:"], "step range 0:1 has 1")])
def test_held_out_errors_refuse_too_few_inputs_in_one_line(factory, capsys, monkeypatch, extra, where):  # noqa: F811
    """The factory's 2 inputs: one left after --min-psnr holds the last out; one per step range
    with two ranges. Refused before anything is measured."""
    measured = []
    _spy(monkeypatch, "measure_mass", measured)
    rc = main(["calibrate", "./m.py:make", *extra, "--held-out-errors", "--out", "m.plan.json"])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().count("\n") == 0, err
    assert f"--held-out-errors needs at least 2 calibration inputs per step range; {where}" in err
    assert not measured


def test_one_cluster_spec_builder_for_calibrate_and_the_bench():
    """cluster_candidates: the smallest site's video tokens (text left out) over the kernel block,
    a given count kept; the bench's --vsopt-clusters and --vsopt-probe go through the same
    builders, and its plans record the probe."""
    import dataclasses

    from vsopt.benchmark.scorer import PlanScorer
    from vsopt.benchmark.settings import BenchSettings, Method
    from vsopt.calibration.clusters import cluster_candidates
    from vsopt.core.clustering import ClusterSpec
    from vsopt.core.ir import TokenGrid
    from vsopt.models.model import ReferenceConfig, build

    from tests.e2e.test_bench import _site

    small = _site(TokenGrid(2, 8, 8, 5, 0))  # 128 video tokens and 5 text tokens
    big = dataclasses.replace(_site(TokenGrid(4, 8, 8)), site_id="blocks.1.attn1")
    assert cluster_candidates([big, small], 16, (0.5, 0.9), refresh=3) == (
        ClusterSpec(8, 8, 0.5, refresh=3), ClusterSpec(8, 8, 0.9, refresh=3))
    assert cluster_candidates([big, small], 16, (0.5,), clusters=(4, 0)) == (ClusterSpec(4, 8, 0.5),)
    assert cluster_candidates([], 16, (0.5,)) == ()

    cfg = ReferenceConfig(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, frames=4,
                          height=16, width=16)
    s = BenchSettings(methods=(Method.VSOPT,), densities=(0.5,), steps=2, calibration_steps=2, vsopt_clusters=True,
                      vsopt_cluster_top_p=(0.7,), vsopt_probe=True)
    scorer = PlanScorer(build(cfg).eval(), s)
    _, options = scorer._calibration(0.5)
    video = [x for x in scorer.sites if x.is_self_attention and x.grid is not None]
    assert options.clusters == cluster_candidates(video, s.block, (0.7,)) and options.clusters
    assert options.error_weights and options.error_weights_probe == "pooled top-k 0.5"
