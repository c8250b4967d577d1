"""The cost model: fitting recovers known coefficients from synthetic timings; files round-trip."""
import json
import math

import numpy as np
import pytest

from vsopt.core.errors import ConfigError
from vsopt.core.costmodel import CostModel, Launch, SiteWork, kernel_key, nnls

TRUE = CostModel(
    gpu="synthetic", launch_us={"none/d64/64x64": 6.0, "int8/d64/64x64": 11.0, "none/d128/64x64": 6.5},
    per_block_us={"none/d64/64x64": 0.020, "int8/d64/64x64": 0.011, "none/d128/64x64": 0.041},
    per_query_block_us={"none/d64/64x64": 0.05, "int8/d64/64x64": 0.07, "none/d128/64x64": 0.09},
    permute_fixed_us=9.0, permute_us_per_mib=0.7, score_fixed_us=4.0, score_us_per_block=0.002)


def _synthetic_measurements(rng, noise):
    out = []
    for quant, d in [("none", 64), ("int8", 64), ("none", 128)]:
        for n in (1024, 4096, 16384):
            qb = 4 * math.ceil(n / 64)
            for density in (0.05, 0.2, 0.5, 1.0):
                visited = int(density * qb * math.ceil(n / 64))
                for permuted in (0.0, n * d * 2 * 4 * 4 / 2**20):
                    work = SiteWork((Launch(quant, d, 64, 64, qb, visited),), permuted_mib=permuted,
                                    scored_blocks=int(rng.integers(0, 3)) * qb * 16)
                    t = TRUE.predict_us(work) * (1 + noise * rng.standard_normal())
                    out.append((work, t))
    return out


def test_fit_recovers_known_coefficients():
    model = CostModel.fit(_synthetic_measurements(np.random.default_rng(0), noise=0.0), gpu="synthetic")
    for key, v in TRUE.per_block_us.items():
        assert model.launch_us[key] == pytest.approx(TRUE.launch_us[key], rel=1e-6)
        assert model.per_block_us[key] == pytest.approx(v, rel=1e-6)
        assert model.per_query_block_us[key] == pytest.approx(TRUE.per_query_block_us[key], rel=1e-6)
    assert model.permute_us_per_mib == pytest.approx(0.7, rel=1e-6)
    assert model.permute_fixed_us == pytest.approx(9.0, rel=1e-6)
    assert model.score_fixed_us == pytest.approx(4.0, rel=1e-6)
    assert model.score_us_per_block == pytest.approx(0.002, rel=1e-6)
    assert model.meta["fit_max_rel_error"] < 1e-8


def test_fit_with_noise_stays_close():
    model = CostModel.fit(_synthetic_measurements(np.random.default_rng(1), noise=0.02), gpu="synthetic")
    for key, v in TRUE.per_block_us.items():
        assert model.per_block_us[key] == pytest.approx(v, rel=0.1)
    assert 0.005 < model.meta["fit_median_rel_error"] < 0.03  # ~ the noise (median |N(0, 0.02)| = 0.0135)


def test_nnls_matches_unconstrained_when_positive_and_clips_otherwise():
    rng = np.random.default_rng(2)
    A = rng.random((40, 5))
    x_true = np.array([1.0, 2.0, 0.5, 3.0, 0.1])
    np.testing.assert_allclose(nnls(A, A @ x_true), x_true, rtol=1e-8)
    x_neg = np.array([1.0, -2.0, 0.5, 3.0, 0.1])
    x = nnls(A, A @ x_neg)
    assert (x >= 0).all() and x[1] == 0.0
    # KKT: the gradient is ~0 on the positive coordinates and <= 0 on the zero ones
    grad = A.T @ (A @ x_neg - A @ x)
    assert np.all(np.abs(grad[x > 0]) < 1e-8) and np.all(grad[x == 0] <= 1e-8)


def test_prediction_is_monotone_and_unmeasured_head_dim_scales():
    w = lambda visited: SiteWork((Launch("none", 64, 64, 64, 100, visited),))
    assert TRUE.predict_us(w(10)) < TRUE.predict_us(w(1000))
    # d=96 is not measured: scaled from the nearest measured head_dim of the same quant and block size
    d96 = TRUE.block_cost_us("none", 96, 64, 64)
    assert d96 in (pytest.approx(0.020 * 96 / 64), pytest.approx(0.041 * 96 / 128))
    with pytest.raises(ConfigError, match="fp8"):
        TRUE.block_cost_us("fp8", 64, 64, 64)
    with pytest.raises(ConfigError, match="unknown quant"):
        kernel_key("int4", 64, 64, 64)


def test_save_load_round_trip_and_rejects_bad_files(tmp_path):
    path = tmp_path / "cm.json"
    TRUE.save(path)
    assert CostModel.load(path) == TRUE
    assert [p.name for p in tmp_path.iterdir()] == ["cm.json"]  # no temp file left behind
    d = json.loads(path.read_text())
    d["version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="version 99"):
        CostModel.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CostModel.load(path)
    d["version"] = 1
    del d["launch_us"]
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="malformed"):
        CostModel.load(path)


def test_shipped_model_loads_and_predicts_sensibly():
    """The shipped fitted model: loads, predicts the reference plan's sites it was checked on (not
    fitted on) within its recorded errors, and orders configurations as measured: more blocks cost
    more; at head_dim 128, 16384 tokens, 8 heads, density 0.2 (a grid point of its measurement,
    benchmarks/results/cost_model_measurements_h200.json, session 11) bf16 through the Gluon route
    355 us < fp8 with its quantization 445 us < int8_int8 678 us. (Session 8, before the Gluon route,
    fp8 was the faster at wan480: 2.24 against 2.76 ms.)"""
    model = CostModel.default()
    check = model.meta["check"]["after"]
    assert check["sites@16384"]["site"]["median"] < 0.05 and check["sites@4096"]["site"]["median"] < 0.1
    assert check["sites@4096"]["dense"]["max"] < 0.05 and model.dense_us(2, 4, 4096, 4096, 64) is not None
    # the per-site overhead measured per launch group and permutation (benchmarks/host_overhead.py)
    from vsopt.core.costmodel import OVERHEAD_KEYS

    assert set(model.overhead_us) == set(OVERHEAD_KEYS) and model.has_group_overhead(False)
    assert model.overhead_us["eager_per_launch"] > model.overhead_us["cudagraphs_per_launch"]
    w = lambda quant, visited: SiteWork((Launch(quant, 128, 128, 128, 8 * 256, visited),))
    assert model.predict_us(w("none", 8 * 256 * 50)) < model.predict_us(w("none", 8 * 256 * 256))
    point = lambda quant: SiteWork((Launch(quant, 128, 128, 128, 8 * 128, round(8 * 128 * 128 * 0.2), 26),))
    assert model.predict_us(point("none")) < model.predict_us(point("fp8")) < model.predict_us(point("int8_int8"))
    assert CostModel.default(gpu="no such GPU").gpu == model.gpu  # falls back to a shipped one


def test_span_sdpa_and_overheads_round_trip_and_validate(tmp_path):
    model = CostModel(gpu="g", launch_us={"none/d64/64x64": 5.0}, per_block_us={"none/d64/64x64": 0.002},
                      per_query_block_us={"none/d64/64x64": 0.01}, per_span_block_us={"none/d64/64x64": 0.3}, slots=264,
                      sdpa_us={"d64": {"launch": 7.0, "block": 0.001}}, overhead_us={"eager": 80.0, "cudagraphs": 5.0})
    small = SiteWork((Launch("none", 64, 64, 64, 132, 132 * 40),))   # fewer rows than slots: 40 blocks in sequence
    assert model.predict_us(small) == pytest.approx(5.0 + 132 * 40 * 0.002 + 132 * 0.01 + 40 * 0.3)
    large = SiteWork((Launch("none", 64, 64, 64, 2640, 2640 * 40),))  # ten rows per slot
    assert model.predict_us(large) == pytest.approx(5.0 + 2640 * 40 * 0.002 + 2640 * 0.01 + 400 * 0.3)
    assert model.dense_us(1, 1, 128, 128, 64) == pytest.approx(7.0 + 4 * 0.001)
    assert model.dense_us(1, 1, 128, 128, 128) == pytest.approx(2 * (7.0 + 4 * 0.001))  # scaled from d64
    assert model.lowering_overhead_us(False) == 80.0 and model.lowering_overhead_us(True) == 5.0
    model.save(tmp_path / "m.json")
    back = CostModel.load(tmp_path / "m.json")
    assert back.to_dict() == model.to_dict() and back.predict_us(small) == model.predict_us(small)
    plain = CostModel(gpu="g", launch_us={}, per_block_us={}, per_query_block_us={})
    assert plain.dense_us(1, 1, 128, 128, 64) is None and plain.lowering_overhead_us(True) == 0.0
    for bad in ({"overhead_us": {"graphs": 1.0}}, {"sdpa_us": {"64": {}}}, {"slots": 0}):
        d = {**model.to_dict(), **bad}
        with pytest.raises(ConfigError, match="malformed cost model"):
            CostModel.from_dict(d)
