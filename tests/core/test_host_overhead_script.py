"""benchmarks/host_overhead.py: the fit of its GPU runs into the cost model's overhead terms (on
made-up runs with known terms), --apply, and its CPU path's counts."""
import importlib.util
import json
from pathlib import Path

import pytest

from vsopt.core.costmodel import CostModel

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "host_overhead.py"


@pytest.fixture(scope="module")
def ho():
    spec = importlib.util.spec_from_file_location("host_overhead", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(base, per_launch, permuted, sites=4, graphs=(3.0, 1.0, 0.5)):
    """Runs whose per-site overhead is exactly base + (groups - 1) per_launch + permuted, eager; under
    CUDA graphs a third of it."""
    gpu = {"dense": 100.0, "1g": 150.0, "1g_perm": 160.0, "2g_perm": 170.0, "3g_perm": 180.0, "4g_perm": 190.0}
    groups = {"1g": 1, "1g_perm": 1, "2g_perm": 2, "3g_perm": 3, "4g_perm": 4}
    runs = [{"variant": "dense", "mode": m, "inlined": True, "wall_us": 300.0, "gpu_us": 100.0 if m == "eager" else None}
            for m in ("eager", "cudagraphs")]
    for v, g in groups.items():
        per = base + (g - 1) * per_launch + (permuted if v.endswith("_perm") else 0.0)
        for mode, f in (("eager", 1.0), ("cudagraphs", 1 / 3)):
            runs.append({"variant": v, "mode": mode, "inlined": True, "gpu_us": gpu[v] if mode == "eager" else None,
                         "wall_us": 300.0 + (gpu[v] - 100.0) + f * per * sites})
    runs.append({"variant": "1g_perm", "mode": "eager", "inlined": False, "gpu_us": 160.0,
                 "wall_us": 300.0 + 60.0 + 2 * (base + permuted) * sites})
    return runs


def test_the_fit_recovers_known_terms(ho):
    terms = ho.fit_overhead(_runs(30.0, 12.0, 20.0), sites=4)
    assert terms["eager"]["base"] == pytest.approx(30.0) and terms["eager"]["per_launch"] == pytest.approx(12.0)
    assert terms["eager"]["permuted"] == pytest.approx(20.0)
    assert terms["cudagraphs"]["per_launch"] == pytest.approx(4.0, abs=0.1)
    assert terms["eager_before_inlining_1g_perm"] == pytest.approx(100.0)


def test_the_dense_baseline_is_the_unprepared_dense_model_where_measured(ho):
    runs = _runs(30.0, 12.0, 20.0)
    # a prepared dense run 40 us/site slower (what inlining dense sites as ATen SDPA measured): not the baseline
    runs.append({"variant": "dense", "mode": "eager", "inlined": False, "wall_us": 300.0, "gpu_us": 100.0})
    runs[0]["wall_us"] += 4 * 40.0
    terms = ho.fit_overhead(runs, sites=4)
    assert terms["eager"]["base"] == pytest.approx(30.0) and terms["eager"]["per_launch"] == pytest.approx(12.0)


def test_apply_writes_the_terms_into_a_cost_model(ho, tmp_path):
    model = CostModel(gpu="test", launch_us={}, per_block_us={}, per_query_block_us={}, overhead_us={"eager": 129.0})
    model.save(tmp_path / "c.json")
    (tmp_path / "r.json").write_text(json.dumps({"gpu": "test", "sites": 4, "runs": _runs(30.0, 12.0, 20.0),
                                                 "overhead_us": {}}))   # refitted from the runs
    ho.apply(str(tmp_path / "r.json"), str(tmp_path / "c.json"))
    got = CostModel.load(tmp_path / "c.json")
    assert got.overhead_us["eager"] == pytest.approx(30.0) and got.overhead_us["eager_per_launch"] == pytest.approx(12.0)
    assert got.has_group_overhead(False) and got.has_group_overhead(True)
    assert got.lowering_overhead_us(False, 3, True) == pytest.approx(30.0 + 24.0 + 20.0)


def test_the_cpu_path_counts_what_the_lowering_emits(ho):
    import argparse

    args = argparse.Namespace(sites=1, cpu_grid=(1, 2, 8), cpu_block=16, fake_cuda=False)
    out = ho.run_cpu(args)
    v = out["variants"]
    assert v["1g"]["graph_inlined"]["launches"] == 1 and v["4g_perm"]["graph_inlined"]["launches"] == 4
    assert v["1g_perm"]["graph_ops"]["vsopt_ops"] == 5 and v["1g_perm"]["graph_inlined"]["vsopt_ops"] == 1
    # the four custom-op permutations' Python work is gone once inlined
    assert v["1g_perm"]["python_calls_per_site_inlined"] < v["1g_perm"]["python_calls_per_site_ops"]
