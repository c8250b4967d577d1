"""Reused dynamic masks as calibration candidates (vsopt.calibration.reuse): offered where pass 2
can measure them, measured as they run (masks of the refresh step on later steps' q/k/v, the
same as vsopt.core.semantics.site_output with masks_from), priced with the scoring amortized."""
import pytest
import torch

from vsopt.calibration import CalibrationOptions, SpeedupBudget
from vsopt.calibration.capture import SiteCall
from vsopt.calibration.choices import head_options
from vsopt.calibration.measure import SiteState, build_candidates, measure_errors, measure_mass
from vsopt.calibration.reuse import measurable_intervals
from vsopt.core import semantics
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.plan import HeadPlan, Quant, Sparsity

from tests.core.test_calibrate_search import COST, local_qk, make_site


def test_measurable_intervals():
    assert measurable_intervals((2, 3), 0, [0, 1, 2, 3]) == (2, 3)
    assert measurable_intervals((2, 3), 0, [0]) == ()  # no step reuses a mask
    assert measurable_intervals((2,), 0, [1, 2]) == ()  # step 1 reuses step 0's mask, not measured
    assert measurable_intervals((2,), 3, [3, 4]) == (2,)  # counted from the range's first step
    assert measurable_intervals((2,), 0, [1, 0]) == ()  # 1 then 0: two runs, step 1's refresh unseen
    assert measurable_intervals((2, 4), 0, [0, 1, 0, 1]) == (2, 4)
    assert measurable_intervals((4,), 0, [0, 2]) == (4,) and measurable_intervals((2,), 0, [0, 2]) == ()


def _calls(grid, heads, steps, seed=0):
    """One call per step whose attention drifts (the window widens step by step)."""
    site = make_site(grid, heads)
    out = []
    for s in range(steps):
        q, k = local_qk(grid, [TokenOrder.FHW] * heads, width=2.0 + 1.5 * s, seed=seed + s)
        v = torch.randn(q.shape, generator=torch.Generator().manual_seed(100 + s))
        out.append(SiteCall(site.site_id, q, k, v, None, 1.0, False, None))
    return site, out


@pytest.mark.parametrize("grid, refresh", [(TokenGrid(2, 4, 8), 2), (TokenGrid(3, 5, 7), 3)])
def test_reuse_candidates_are_measured_as_they_run(grid, refresh):
    site, calls = _calls(grid, 2, steps=4)
    opt = CalibrationOptions(block_m=16, block_n=16, orders=(TokenOrder.FHW,), patterns=False, mass_shares=(0.9,),
                             dynamic_values=(), dynamic_top_k=(0.3,), mask_refresh=(refresh,), skip=False)
    state = SiteState(site, opt, (TokenOrder.FHW,))
    state.refresh = measurable_intervals(opt.mask_refresh, 0, range(4))
    for call in calls:
        measure_mass(state, call)
    build_candidates(state)
    labels = [c.label for c in state.candidates]
    assert f"topk@0.3/every{refresh}" in labels
    for s, call in enumerate(calls):
        measure_errors(state, call, s)
    c_fresh, c_reuse = labels.index("topk@0.3"), labels.index(f"topk@0.3/every{refresh}")
    spec = state.candidates[c_reuse].dynamic
    assert spec.reuse_steps == refresh - 1
    heads = [HeadPlan(Sparsity.DYNAMIC, dynamic=spec, block_m=16, block_n=16)] * 2
    want = torch.zeros(2, dtype=torch.float64)
    for s, call in enumerate(calls):  # the reference: site_output with the refresh step's masks
        at = calls[semantics.mask_refresh_step(spec, s)]
        out = semantics.site_output(site, heads, call.q, call.k, call.v, 1.0, masks_from=(at.q, at.k))
        ref = torch.nn.functional.scaled_dot_product_attention(call.q, call.k, call.v, scale=1.0)
        want += (out.double() - ref.double()).pow(2).sum((0, 2, 3))
    torch.testing.assert_close(state.err2[:, c_reuse], want, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(state.err2[:, c_reuse], state.err2[:, c_fresh])  # stale masks: another error
    # the reused candidate is priced cheaper: its pooled scoring runs once per refresh
    opts = head_options(state, COST, (Quant.NONE,))
    by = {o.candidate: o for o in opts[0]}
    assert by[c_reuse].time_us < by[c_fresh].time_us


def test_a_missing_refresh_step_is_an_error_not_a_fresh_mask():
    site, calls = _calls(TokenGrid(2, 4, 8), 2, steps=3)
    opt = CalibrationOptions(block_m=16, block_n=16, orders=(TokenOrder.FHW,), patterns=False, dynamic_values=(),
                             dynamic_top_k=(0.3,), mask_refresh=(2,))
    state = SiteState(site, opt, (TokenOrder.FHW,))
    state.refresh = (2,)
    measure_mass(state, calls[0])
    build_candidates(state)
    with pytest.raises(ConfigError, match="step 1 reuses the mask of step 0"):
        measure_errors(state, calls[1], 1)
    with pytest.raises(ConfigError, match="need each input's denoising step"):
        measure_errors(state, calls[1])


@pytest.mark.parametrize("value, message", [((1,), "1 is recomputing at every step"), ((0,), "not an integer >= 1"),
                                            (("2",), "not an integer >= 1")])
def test_refresh_options_are_checked(value, message):
    with pytest.raises(ConfigError, match=message):
        CalibrationOptions(mask_refresh=value)
