"""calibrate --check's sampler run (calibration.check.reference_sampler_check) samples as the plan
will be used: with classifier-free guidance (`vsopt demo` uses 3) every sampler call holds the cond
and uncond halves, so the lowered graph is traced at that batch and the sampler gets the guidance."""
import dataclasses

import pytest

from vsopt.calibration.check import reference_sampler_check
from vsopt.models import sampler
from vsopt.models.model import load_shipped, shipped_plan


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampler_check_samples_with_the_given_guidance(monkeypatch, guidance):
    ref = load_shipped().eval()
    ref.config = dataclasses.replace(ref.config, frames=2, height=8, width=8)  # 32 video tokens
    seen = []
    real = sampler.sample

    def spy(model, cond, shape, **kw):
        seen.append((kw["guidance"], kw["uncond"] is not None, cond.shape[0]))
        return real(model, cond, shape, **kw)

    monkeypatch.setattr(sampler, "sample", spy)
    # the shipped 4096-token plan, fitted to this clip (every site stays dense: the check must
    # give back the dense clip, at any guidance)
    result = reference_sampler_check(ref, str(shipped_plan(16, 32, 32)), clips=1, steps=2, guidance=guidance)
    # the probe run the graph is traced on, then the dense and the planned runs: all guided alike
    assert seen == [(guidance, guidance != 1.0, 1)] * 3
    assert result["sampler_psnr_db"] > 60, result
