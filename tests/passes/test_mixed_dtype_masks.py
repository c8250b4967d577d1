"""An additive mask of another dtype than the scores it is added to, in bf16 (found on the H200 by
tests/kernels/gpu_check_coverage.py: diffusers Mochi's attention pooler, whose SDPA CUDA runs as its
math path, traced to ATen as float32 scores of the bf16 inputs plus the boolean mask made additive in
bf16). The model adds with type promotion; SDPA (vsopt.attention's reference) takes a mask in float32 or
the query's dtype only, so the rewritten site must not hand it the model's bf16 mask next to a float32
query ("Expected attn_mask dtype to be bool or float or to match query dtype")."""
from __future__ import annotations

import pytest
import torch

from vsopt.core.plan import HeadPlan, Plan, SitePlan

from ..conftest import op_names


class UpcastMath(torch.nn.Module):
    """softmax(q k^T * scale + mask) v with a boolean mask made additive in `mask_dtype`.
    upcast: as CUDA's math SDPA computes 16-bit inputs (q, k, v upcast to float32, each scaled by
    sqrt(scale), the output cast back); else the scores in the inputs' dtype, the mask added to them
    in its own dtype (promoted to float32), the probabilities cast back to v's dtype."""

    def __init__(self, mask_dtype: torch.dtype, upcast: bool = True):
        super().__init__()
        self.mask_dtype, self.upcast = mask_dtype, upcast

    def forward(self, q, k, v, keep):
        bias = torch.zeros(keep.shape, dtype=self.mask_dtype).masked_fill(~keep, float("-inf"))
        if self.upcast:
            s = (q.float() * 0.5) @ (k.float() * 0.5).transpose(-2, -1)
            return (torch.softmax(s + bias, -1) @ v.float()).to(q.dtype)
        s = (q * 0.5) @ (k * 0.5).transpose(-2, -1)
        return torch.softmax(s + bias, -1).to(v.dtype) @ v


def _inputs(n=7, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).bfloat16() for _ in range(3))
    keep = torch.rand(1, 1, n, n, generator=g) > 0.4
    keep[..., 0] = True   # no empty row
    return q, k, v, keep


def _mask_dtype_at_site(gm):
    (node,) = [n for n in gm.graph.nodes if n.target is torch.ops.vsopt.attention.default]
    return node.args[3].meta["val"].dtype, node.args[0].meta["val"].dtype


@pytest.mark.parametrize("mask_dtype,upcast", [(torch.bfloat16, True), (torch.float16, True),
                                               (torch.float32, False), (torch.float16, False)])
def test_the_rewritten_site_takes_a_mask_sdpa_accepts(compile_rewrite, mask_dtype, upcast):
    model = UpcastMath(mask_dtype, upcast)
    for seed, n in ((0, 7), (1, 16)):
        args = _inputs(n=n, seed=seed)
        want = model(*args)
        got, [(gm, report)] = compile_rewrite(model, *args)
        assert [s.rule for s in report.sites] == ["softmax"] and "vsopt.attention.default" in op_names(gm)
        m, q = _mask_dtype_at_site(gm)
        assert m in (torch.float32, q), (m, q)
        assert got.dtype == want.dtype
        # both compute the softmax in float32 at least where the model did; bf16 output rounding apart
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
        # and under a plan keeping the site dense (strict: it is lowered, not left alone)
        site = report.sites[0]
        plan = Plan({site.site_id: SitePlan.for_site(site, HeadPlan())})
        got_plan, _ = compile_rewrite(model, *args, options={"plan": plan, "strict": True})
        torch.testing.assert_close(got_plan.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_through_inductor_in_bf16():
    """The real backend (Inductor), as the GPU check runs it."""
    model = UpcastMath(torch.bfloat16)
    args = _inputs()
    torch._dynamo.reset()
    got = torch.compile(model, backend="vsopt")(*args)
    torch.testing.assert_close(got.float(), model(*args).float(), atol=2e-2, rtol=2e-2)
