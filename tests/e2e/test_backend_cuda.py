"""The backend on CUDA (GPU machines only): torch.compile(backend="vsopt") lowers SDPA to the
CUDA-specific ATen ops (flash / efficient / cuDNN), which the CPU tests never see. Each form is
detected, rewritten (no softmax or SDPA op left) and equal to eager.

Runs under pytest, or as a script on the GPU machine: python3 tests/e2e/test_backend_cuda.py"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max()).item()


class _Forms(torch.nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, q, k, v, mask):
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v)
        if self.form == "sdpa_bnhd_mask":
            qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
        if self.form == "sdpa_causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.form == "matmul":
            s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + mask
            return s.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
        raise ValueError(self.form)


FORMS = ["sdpa", "sdpa_bnhd_mask", "sdpa_causal", "matmul"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def check(form: str, dtype: torch.dtype) -> dict:
    from vsopt.backend import trace_and_rewrite
    from vsopt.core.config import VsoptConfig

    torch.manual_seed(0)
    B, H, N, D = 2, 4, 197, 64
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(3))
    mask = torch.randn(1, 1, N, N, device="cuda", dtype=dtype)
    model = _Forms(form).eval()
    seen = {}

    def backend(gm, example_inputs):
        out_gm, report = trace_and_rewrite(gm, example_inputs, VsoptConfig())
        after = [str(n.target) for n in out_gm.graph.nodes if n.op == "call_function"]
        seen.update(sites=len(report.sites), skipped=[s.reason for s in report.skipped], after=after)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(out_gm, list(example_inputs))

    # the ATen spelling Dynamo's graph lowers to on this device (what the rule must match)
    from vsopt.backend import to_aten

    def spy(gm, example_inputs):
        aten_gm = to_aten(gm, example_inputs)
        seen["aten_ops"] = sorted({str(n.target) for n in aten_gm.graph.nodes
                                   if "attention" in str(n.target) or "softmax" in str(n.target)})
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=spy)(q, k, v, mask)
        torch._dynamo.reset()
        want = model(q, k, v, mask)
        got = torch.compile(model, backend=backend)(q, k, v, mask)
        ref = model(*(t.double() for t in (q, k, v, mask)))
    return {"form": form, "dtype": str(dtype), "aten_ops": seen["aten_ops"], "sites": seen["sites"],
            "skipped": seen["skipped"],
            "left": [o for o in seen["after"] if "softmax" in o or "scaled_dot_product" in o],
            "err_vs_eager": _rel(got, want), "err_vs_fp64": _rel(got, ref), "eager_err_vs_fp64": _rel(want, ref)}


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_cuda_backend(form, dtype):
    r = check(form, dtype)
    assert r["sites"] == 1 and not r["left"], r
    assert r["err_vs_fp64"] <= max(2 * r["eager_err_vs_fp64"], 1e-5), r


if __name__ == "__main__":
    import json

    print(torch.__version__, torch.cuda.get_device_name())
    for form in FORMS:
        for dtype in DTYPES:
            try:
                print(json.dumps(check(form, dtype)))
            except Exception as e:  # noqa: BLE001 - a report script: show every case
                print(json.dumps({"form": form, "dtype": str(dtype), "error": f"{type(e).__name__}: {e}"[:600]}))
