"""CalibrationResult's overall figures weigh each step range by the steps it runs, as the
density budget counts blocks: a plan of 0.5 on 4 steps and 0.375 on 16 has density 0.4."""
import pytest

from vsopt.calibration.result import CalibrationResult, SiteResult


def _site(sid, steps, n, density, pred, dense, overhead=0.0):
    return SiteResult(sid, steps, predicted_rel_l2=0.1, actual_rel_l2=None, density=density, predicted_us=pred,
                      dense_us=dense, choices=[], overhead_us=overhead, step_count=n)


def test_step_ranges_weigh_the_steps_they_run():
    sites = [_site("a", (0, 4), 4, 0.5, 100.0, 200.0, 10.0), _site("a", (4, None), 16, 0.375, 80.0, 200.0, 5.0),
             _site("b", (0, 4), 4, 0.25, 60.0, 100.0), _site("b", (4, None), 16, 1.0, 100.0, 100.0)]
    r = CalibrationResult(plan=None, sites=sites, left_dense={}, budget="test")
    assert r.density == pytest.approx((4 * 0.5 + 16 * 0.375 + 4 * 0.25 + 16 * 1.0) / 40)
    # per step: a 0.2 * 100 + 0.8 * 80 = 84, b 0.2 * 60 + 0.8 * 100 = 92
    assert r.per_step_us("predicted_us") == pytest.approx(84.0 + 92.0)
    assert r.per_step_us("dense_us") == pytest.approx(300.0)
    assert r.per_step_us("overhead_us") == pytest.approx(0.2 * 10 + 0.8 * 5)
    table = r.table()
    assert "overall density 0.625 over the steps" in table and "(1.70x) per step" in table


def test_without_step_ranges_the_plain_sum():
    sites = [_site("a", None, 1, 0.5, 100.0, 200.0), _site("b", None, 1, 0.25, 50.0, 100.0)]
    r = CalibrationResult(plan=None, sites=sites, left_dense={}, budget="test")
    assert r.density == pytest.approx(0.375)
    assert r.per_step_us("predicted_us") == pytest.approx(150.0)
    assert "overall density 0.375; predicted attention time 0.150 ms vs dense 0.300 ms (2.00x)\n" in r.table() + "\n"
