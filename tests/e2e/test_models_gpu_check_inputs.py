"""The GPU coverage check's models and inputs (tests/kernels/gpu_check_coverage.py) run in bf16 on
the CPU, eagerly: the check failed on the H200 on its own inputs once (a float32 timestep into a bf16
HunyuanVideo 1.5: "mat1 and mat2 must have the same dtype"), with no GPU minute to spare."""
import importlib.util
import pathlib

import pytest
import torch

_PATH = pathlib.Path(__file__).parents[1] / "kernels" / "gpu_check_coverage.py"
_spec = importlib.util.spec_from_file_location("gpu_check_coverage", _PATH)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


@pytest.mark.parametrize("name", ["mochi", "hunyuan15"])
def test_the_check_runs_its_models_in_bf16(name):
    model, inputs = getattr(check, name)("cpu", torch.bfloat16)
    with torch.no_grad():
        out = check.sample(model(*inputs))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    assert all(t.dtype in (torch.bfloat16, torch.bool, torch.int64) for t in inputs if isinstance(t, torch.Tensor))
