"""Masks on the scores (issue 12, items 1-2): a fill is rewritten only where it equals a keep mask,
and rows a mask empties give what the original graph gives (NaN from aten._softmax, the mean of
v for a finite fill), never the 0 of SDPA kernels."""
from __future__ import annotations

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.errors import UnsupportedSiteError
from vsopt.passes import DEFAULT_PIPELINE, PassContext, run_pipeline

from ..conftest import op_names

SCALE = 0.3


def _scores(q, k):
    return q @ k.transpose(-1, -2)


FORMS = {  # how a model masks its scores with a constant `fill` where `keep` is False
    "masked_fill after the scale": lambda s, keep, fill: (s * SCALE).masked_fill(~keep, fill),
    "masked_fill before the scale": lambda s, keep, fill: s.masked_fill(~keep, fill) * SCALE,
    "where(keep, s, fill)": lambda s, keep, fill: torch.where(keep, s * SCALE, fill),
    "where(~keep, fill, s)": lambda s, keep, fill: torch.where(~keep, fill, s * SCALE),
    "additive": lambda s, keep, fill: s * SCALE + torch.where(keep, 0.0, fill),
}


class Masked(torch.nn.Module):
    def __init__(self, form: str, fill: float):
        super().__init__()
        self.form, self.fill = form, fill

    def forward(self, q, k, v, keep):
        return FORMS[self.form](_scores(q, k), keep, self.fill).softmax(-1) @ v


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g, dtype=dtype) for _ in range(3))
    keep = torch.rand(6, 6, generator=g) > 0.4
    keep[2] = False  # a fully masked row: NaN in eager for -inf, the mean of v for a finite fill
    keep[3] = True
    return q, k, v, keep


def _rewritten(form: str, fill: float) -> bool:
    at_softmax = fill * (SCALE if form == "masked_fill before the scale" else 1.0)
    return form == "additive" or at_softmax <= -1e4


@pytest.mark.parametrize("fill", [-math.inf, -1e9, -1e4, 0.0, -1.0, 2.5])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_fill_is_exact_or_left_alone_with_the_reason(compile_rewrite, form, fill):
    model = Masked(form, fill)
    inputs = _inputs()
    want = model(*inputs)
    got, [(gm, report)] = compile_rewrite(model, *inputs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, equal_nan=True)
    exported, export_report = trace_and_rewrite(model, inputs, VsoptConfig())  # torch.export's graph
    torch.testing.assert_close(exported(*inputs), want, atol=1e-6, rtol=1e-6, equal_nan=True)
    if _rewritten(form, fill):
        for r, g in ((report, gm), (export_report, exported)):
            assert [s.rule for s in r.sites] == ["softmax"] and "vsopt.attention.default" in op_names(g)
    else:
        assert report.sites == [] and len(report.skipped) == 1
        assert "filled with the finite value" in report.skipped[0].reason
        with pytest.raises(UnsupportedSiteError, match="a select, not a mask"):
            trace_and_rewrite(model, inputs, VsoptConfig(strict=True))


def test_fully_masked_rows_through_inductor():
    """The real backend: NaN rows stay NaN (aten._softmax), in float64 too."""
    for fill in (-math.inf, -1e9):
        model = Masked("masked_fill after the scale", fill)
        inputs = _inputs(torch.float64)
        torch._dynamo.reset()
        got = torch.compile(model, backend="vsopt")(*inputs)
        torch.testing.assert_close(got, model(*inputs), atol=1e-12, rtol=1e-12, equal_nan=True)
        assert got[:, :, 2].isnan().all() == (fill == -math.inf)


def test_boolean_mask_added_to_the_scores_is_a_number():
    """scores + keep adds 0/1; as an attention mask a boolean tensor would mean 'keep'."""
    def f(q, k, v, keep):
        return (_scores(q, k) * SCALE + keep).softmax(-1) @ v

    inputs = _inputs()
    got, [(gm, report)] = _run(f, inputs)
    assert len(report.sites) == 1
    torch.testing.assert_close(got, f(*inputs), atol=1e-6, rtol=1e-6)


def test_safe_softmax_rows_give_zero():
    """aten._safe_softmax (what SDPA's math path decomposes into) gives 0 for an all -inf row."""
    def f(q, k, v, keep):
        s = (_scores(q, k) * SCALE).masked_fill(~keep, -math.inf)
        return torch.ops.aten._safe_softmax(s, -1) @ v

    inputs = _inputs()
    got, [(gm, report)] = _run(f, inputs)
    assert [s.rule for s in report.sites] == ["softmax"]
    want = f(*inputs)
    assert (want[:, :, 2] == 0).all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _run(f, inputs):
    """make_fx's ATen graph of f through the pipeline, run on the inputs."""
    gm = make_fx(f, tracing_mode="fake")(*inputs)
    report = run_pipeline(gm, PassContext(config=VsoptConfig()), DEFAULT_PIPELINE)
    return gm(*inputs), [(gm, report)]


def test_a_fill_from_a_tensor_is_named():
    """torch.where(keep, scores, other) with a tensor `other` is no mask: left alone, and said so."""
    def f(q, k, v, keep):
        s = _scores(q, k) * SCALE
        return torch.where(keep, s, s.detach() * 0.5).softmax(-1) @ v

    inputs = _inputs()
    got, [(gm, report)] = _run(f, inputs)
    assert report.sites == [] and "is not a scalar scale, a mask" in report.skipped[0].reason
