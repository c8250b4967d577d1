"""CalibrationOptions.held_out_errors: pass 1 (block mass, masks) on the first half of each step
range's inputs, pass 2 (candidate errors) on the rest, so that a mask's error is not measured on
the input it was made from; a range with one input is refused with a clear error."""
import pytest
import torch

import vsopt.calibration.run as run
from vsopt.calibration import CalibrationOptions, DensityBudget, calibrate
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.plan import Quant
from tests.core.test_calibrate_search import COST
from tests.e2e.test_step_ranges import Attn  # 2 heads of 16 over (B, N, 32)

GRID = TokenGrid(2, 4, 8)


def _calibrate(monkeypatch, model, inputs, held_out, **kw):
    seen = {"mass": [], "errors": []}
    from vsopt.calibration.measure import measure_errors as errors, measure_mass as mass

    def measure_mass(st, call):
        seen["mass"].append(call.q.clone())
        mass(st, call)

    def measure_errors(st, call, step=None):
        seen["errors"].append(call.q.clone())
        errors(st, call, step)

    monkeypatch.setattr(run, "measure_mass", measure_mass)
    monkeypatch.setattr(run, "measure_errors", measure_errors)
    options = CalibrationOptions(block_m=16, block_n=16, held_out_errors=held_out, quants=(Quant.NONE,),
                                 cost_model=COST, **kw)
    result = calibrate(model, inputs, DensityBudget(0.5), options=options, progress=False, grid=GRID)
    return result, seen


def test_held_out_errors_are_measured_on_other_inputs_than_the_masks(monkeypatch):
    torch.manual_seed(0)
    model, inputs = Attn().eval(), [(torch.randn(1, GRID.num_tokens, 32),) for _ in range(4)]
    plain, all_seen = _calibrate(monkeypatch, model, inputs, False)
    held, seen = _calibrate(monkeypatch, model, inputs, True)
    qs = all_seen["mass"]  # without held-out: both passes on all 4 inputs, in order
    assert len(qs) == 4 and len(all_seen["errors"]) == 4
    assert len(seen["mass"]) == 2 and len(seen["errors"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(seen["mass"], qs[:2]))    # masks from inputs 0, 1
    assert all(torch.equal(a, b) for a, b in zip(seen["errors"], qs[2:]))  # errors on inputs 2, 3
    assert held.plan.meta["calibration"]["options"]["held_out_errors"] is True
    assert set(held.plan.sites) == set(plain.plan.sites)


def test_held_out_errors_need_two_inputs_per_step_range(monkeypatch):
    inputs = [(torch.randn(1, GRID.num_tokens, 32),) for _ in range(3)]
    with pytest.raises(ConfigError, match="held_out_errors needs at least 2 calibration inputs per step range; "
                                          "step range 2: has 1"):
        _calibrate(monkeypatch, Attn().eval(), [run.RecordedCall(i, i, x) for i, x in enumerate(inputs)], True,
                   step_ranges=((0, 2), (2, None)))
