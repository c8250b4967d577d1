"""Every way of writing attention that the rules cover, through both graph levels:
torch.compile (Dynamo -> make_fx ATen, post-dispatch ops) and torch.export (training IR).
Each case checks the number of sites, their shape fields, which ops remain, and equality with eager."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.errors import UnsupportedSiteError
from vsopt.core.ir import Layout

from ..conftest import max_rel_err, op_names

B, H, N, M, D = 2, 3, 7, 5, 4  # odd sizes on purpose; M keys for cross-attention


class Form(nn.Module):
    """One attention written as fn(q, k, v, mask); q/k/v given in (B, H, N, D) unless noted."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v, mask):
        return self.fn(q, k, v, mask)


def _bhnd(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_bnhd(q, k, v, mask):  # the model keeps (B, N, H, D) and transposes around SDPA
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[0, 0] > 0).transpose(1, 2)


def _sdpa_causal(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)


def _mul_after(q, k, v, mask):
    return ((q @ k.transpose(-2, -1)) * D ** -0.5).softmax(dim=-1) @ v


def _div_after_additive_mask(q, k, v, mask):
    s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D) + mask
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _scale_before_bool_mask(q, k, v, mask):
    s = (q * 0.5) @ (k * 0.25).transpose(-1, -2)
    s = s.masked_fill(mask <= 0, float("-inf"))
    return F.dropout(s.softmax(-1), p=0.0, training=True) @ v


def _mask_before_scale(q, k, v, mask):  # (s + mask) * scale: the mask is scaled too
    return (((q @ k.transpose(-2, -1)) + mask) * 0.7).softmax(-1) @ v


def _bmm_heads_merged(q, k, v, mask):
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, -1, d) for t in (q, k, v))
    p = torch.bmm(q3, k3.transpose(1, 2)).mul(0.2).softmax(-1)
    return torch.bmm(p, v3).reshape(b, h, n, d)


def _baddbmm_mask(q, k, v, mask):
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, -1, d) for t in (q, k, v))
    bias = mask.expand(b, h, n, -1).reshape(b * h, n, -1)
    p = torch.baddbmm(bias, q3, k3.transpose(1, 2), beta=1.0, alpha=0.35).softmax(-1)
    return torch.bmm(p, v3).reshape(b, h, n, d)


def _einsum(q, k, v, mask):
    p = torch.einsum("bhqd,bhkd->bhqk", q, k).mul(0.4).softmax(-1)
    return torch.einsum("bhqk,bhkd->bhqd", p, v)


def _einsum_bnhd(q, k, v, mask):  # given (B, N, H, D) tensors; output straight back in (B, N, H, D)
    p = (torch.einsum("bnhd,bmhd->bhnm", q, k) * 0.4).softmax(-1)
    return torch.einsum("bhnm,bmhd->bnhd", p, v)


def _mqa(q, k, v, mask):  # one kv head, broadcast by matmul
    return ((q @ k[:, :1].transpose(-2, -1)) * 0.5).softmax(-1) @ v[:, :1]


def _gqa(q6, k, v, mask):  # 6 query heads, 3 kv heads, repeat_interleave-style expand
    def rep(t):
        b, h, n, d = t.shape
        return t[:, :, None].expand(b, h, 2, n, d).reshape(b, h * 2, n, d)
    return ((q6 @ rep(k).transpose(-2, -1)) * 0.5).softmax(-1) @ rep(v)


# (name, fn, rule, layout, heads, kv_heads, query heads given to fn)
FORMS = [
    ("sdpa_bhnd", _bhnd, "sdpa", Layout.BHND, H, H, H),
    ("sdpa_bnhd_bool_mask", _sdpa_bnhd, "sdpa", Layout.BNHD, H, H, H),
    ("sdpa_causal", _sdpa_causal, "sdpa", Layout.BHND, H, H, H),
    ("matmul_mul_after", _mul_after, "softmax", Layout.BHND, H, H, H),
    ("matmul_div_additive_mask", _div_after_additive_mask, "softmax", Layout.BHND, H, H, H),
    ("scale_before_bool_mask_dropout0", _scale_before_bool_mask, "softmax", Layout.BHND, H, H, H),
    ("mask_before_scale", _mask_before_scale, "softmax", Layout.BHND, H, H, H),
    ("bmm_heads_merged", _bmm_heads_merged, "softmax", Layout.BN_D, H, H, H),
    ("baddbmm_mask", _baddbmm_mask, "softmax", Layout.BN_D, H, H, H),
    ("einsum", _einsum, "softmax", Layout.BHND, H, H, H),
    ("einsum_bnhd", _einsum_bnhd, "softmax", Layout.BNHD, H, H, H),
    ("mqa", _mqa, "softmax", Layout.BHND, H, 1, H),
    ("gqa", _gqa, "softmax", Layout.BHND, 2 * H, H, 2 * H),
]
ATTENTION_OPS = ("softmax", "scaled_dot_product", "bmm", "matmul", "einsum")


def _inputs(q_heads: int, cross: bool = False):
    g = torch.Generator().manual_seed(q_heads)
    kv_len = M if cross else N
    q = torch.randn(B, q_heads, N, D, generator=g)
    k, v = torch.randn(B, H, kv_len, D, generator=g), torch.randn(B, H, kv_len, D, generator=g)
    mask = torch.randn(1, 1, N, kv_len, generator=g)
    mask[..., 0] = 1.0  # every query keeps at least one key under the boolean forms
    return q, k, v, mask


def _check(gm, report, out, want, rule, layout, heads, kv_heads):
    assert len(report.sites) == 1, report.sites
    s = report.sites[0]
    assert (s.rule, s.layout, s.heads, s.kv_heads, s.head_dim, s.q_len) == (rule, layout, heads, kv_heads, D, N)
    ops = op_names(gm)
    assert ops.count("vsopt.attention.default") == 1
    assert not [o for o in ops if any(a in o for a in ATTENTION_OPS)], ops
    assert max_rel_err(out, want) <= 1e-5


@pytest.mark.parametrize("name,fn,rule,layout,heads,kv_heads,qh", FORMS, ids=[f[0] for f in FORMS])
def test_form_compile_and_export(compile_rewrite, name, fn, rule, layout, heads, kv_heads, qh):
    model = Form(fn).eval()
    inputs = _inputs(qh, cross=name in ("matmul_mul_after", "einsum"))
    if name == "einsum_bnhd":
        inputs = tuple(t.transpose(1, 2).contiguous() for t in inputs[:3]) + inputs[3:]
    want = model(*inputs)
    out, graphs = compile_rewrite(model, *inputs)
    assert len(graphs) == 1
    _check(*graphs[0], out, want, rule, layout, heads, kv_heads)
    gm, report = trace_and_rewrite(model, inputs, VsoptConfig())  # torch.export's graph
    _check(gm, report, gm(*inputs), want, rule, layout, heads, kv_heads)
    assert report.sites[0].scale == pytest.approx(graphs[0][1].sites[0].scale)


def _softmax_wrong_axis(q, k, v, mask):
    return ((q @ k.transpose(-2, -1)) * 0.5).softmax(dim=-2) @ v


def _not_attention(q, k, v, mask):  # two matmuls around a relu: no softmax, not attention
    return torch.relu(q @ k.transpose(-2, -1)) @ v


def _probs_returned(q, k, v, mask):  # probabilities escape: rewriting would drop them
    p = (q @ k.transpose(-2, -1)).softmax(-1)
    return p @ v, p


@pytest.mark.parametrize("fn,skipped", [(_softmax_wrong_axis, "not the key axis"), (_not_attention, None),
                                        (_probs_returned, "also used outside")])
def test_negative_forms_are_left_alone(compile_rewrite, fn, skipped):
    model = Form(fn).eval()
    inputs = _inputs(H)
    want = model(*inputs)
    out, [(gm, report)] = compile_rewrite(model, *inputs)
    assert report.sites == []
    assert "vsopt.attention.default" not in op_names(gm)
    if skipped is None:
        assert report.skipped == []
    else:
        assert len(report.skipped) == 1 and skipped in report.skipped[0].reason
    for o, w in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,)):
        assert max_rel_err(o, w) <= 1e-6
    if skipped is not None:
        with pytest.raises(UnsupportedSiteError, match=skipped):
            trace_and_rewrite(model, inputs, VsoptConfig(strict=True))


def test_bf16_within_rounding_of_sdpa(compile_rewrite):
    model = Form(_div_after_additive_mask).eval()
    q, k, v, mask = (t.to(torch.bfloat16) for t in _inputs(H))
    out, [(gm, report)] = compile_rewrite(model, q, k, v, mask)
    assert report.sites[0].dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double(),
                                         scale=1 / math.sqrt(D))
    sdpa_err = max_rel_err(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(D)), ref)
    assert max_rel_err(out, ref) <= max(2 * sdpa_err, 2 ** -8)


def test_inductor_backend_equals_eager_and_trains():
    """The real backend (Inductor after the passes), in eval and in training mode with gradients."""
    torch._dynamo.reset()
    model = Form(_gqa)
    q, k, v, mask = (t.requires_grad_() for t in _inputs(2 * H))
    want = model(q, k, v, mask)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    out = torch.compile(model, backend="vsopt")(q, k, v, mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert max_rel_err(out, want) <= 1e-5
    for g, w in zip(grads, want_grads):
        assert max_rel_err(g, w) <= 1e-4


def test_user_grid_and_bad_grid():
    model = Form(_bhnd).eval()
    inputs = _inputs(H)
    _, report = trace_and_rewrite(model, inputs, VsoptConfig.from_options({"grid": (1, 1, 7)}))
    assert str(report.sites[0].grid) == "1x1x7" and report.sites[0].grid_source.value == "user"
    _, report = trace_and_rewrite(model, inputs, VsoptConfig.from_options({"grid": (1, 2, 7)}))
    assert report.sites[0].grid is None  # a global grid of another length is not applied
    with pytest.raises(Exception, match="has 14 tokens"):
        trace_and_rewrite(model, inputs, VsoptConfig.from_options({"grids": {"attention.0": (1, 2, 7)}}))


class _TensorScale(nn.Module):  # the scale is a buffer: its value is not in the graph's metadata
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, q, k, v, mask):
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1) @ v


def test_tensor_scale_is_left_alone_with_its_reason(compile_rewrite):
    model = _TensorScale().eval()
    inputs = _inputs(H)
    out, [(gm, report)] = compile_rewrite(model, *inputs)
    assert report.sites == [] and len(report.skipped) == 1
    assert "is not a scalar scale, a mask, a cast or a reshape" in report.skipped[0].reason
    assert max_rel_err(out, model(*inputs)) <= 1e-6


def test_dynamic_shapes_are_left_alone_not_miscompiled():
    """With symbolic sizes the rewrite would bake in one shape, so the sites stay as they were
    (with the reason) and results stay right for every shape."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    from vsopt.backend import trace_and_rewrite as tr
    from vsopt.core.config import VsoptConfig as Cfg

    graphs = []

    def backend(gm, example_inputs):
        symbolic = any(free_symbols(n.meta["example_value"]) for n in gm.graph.nodes if n.op == "placeholder")
        out_gm, report = tr(gm, example_inputs, Cfg())
        graphs.append((symbolic, report))
        return out_gm

    torch._dynamo.reset()
    model = Form(_mul_after).eval()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for n in (N, N + 2, N + 5):
        q, k, v, mask = _inputs(H)
        q = torch.randn(B, H, n, D)
        assert max_rel_err(compiled(q, k, v, mask), model(q, k, v, mask)) <= 1e-5
    assert graphs
    for symbolic, report in graphs:
        if not symbolic:
            assert len(report.sites) == 1
        elif report.sites:
            # torch 2.11's make_fx specialises a symbolic graph to the example's sizes (with
            # guards), so the rewrite is exact for that shape and each new shape recompiles
            assert len(graphs) == 3, "a rewritten symbolic graph served another shape"
        else:  # torch 2.14: sizes stay symbolic, so the site is left alone with the reason
            assert "symbolic" in report.skipped[0].reason


class _PatchifyVideo(nn.Module):
    """A video transformer layer with a patchify reshape (no convolution) and text tokens after
    the video: the grid is (F/pf) x (H/ph) x (W/pw) + text."""

    def __init__(self, c=2, pf=1, ph=2, pw=2, dim=16, heads=2):
        super().__init__()
        self.p, self.heads = (pf, ph, pw), heads
        self.embed = nn.Linear(c * pf * ph * pw, dim)
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, latent, text):
        b, c, f, h, w = latent.shape
        pf, ph, pw = self.p
        x = latent.reshape(b, c, f // pf, pf, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = self.embed(x.reshape(b, (f // pf) * (h // ph) * (w // pw), c * pf * ph * pw))
        x = torch.cat([x, text], dim=1)
        q, k, v = self.qkv(x).reshape(b, x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def test_grid_from_patchify_reshape_and_text_after(compile_rewrite):
    model = _PatchifyVideo().eval()
    inputs = (torch.randn(1, 2, 3, 4, 6), torch.randn(1, 5, 16))
    _, [(gm, report)] = compile_rewrite(model, *inputs)
    _, export_report = trace_and_rewrite(model, inputs, VsoptConfig())
    for r in (report, export_report):
        assert [str(s.grid) for s in r.sites] == ["3x2x3+5"] and r.sites[0].grid_source.value == "inferred"


@pytest.mark.parametrize("q_shape,kv_shape", [((1, 1, 1, 4), (1, 1, 5, 4)), ((2, 3, 1, 4), (2, 3, 5, 4)),
                                              ((2, 3, 6, 4), (2, 3, 1, 4)), ((1, 1, 6, 1), (1, 1, 5, 1))])
def test_size_one_axes(compile_rewrite, q_shape, kv_shape):
    """Axes of size 1 (one query, one key, one head, head_dim 1) carry no index; still matched."""
    model = Form(_mul_after).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(*q_shape, generator=g), torch.randn(*kv_shape, generator=g),
              torch.randn(*kv_shape, generator=g), None)
    want = model(*inputs)
    out, [(gm, report)] = compile_rewrite(model, *inputs)
    _, export_report = trace_and_rewrite(model, inputs, VsoptConfig())
    for r in (report, export_report):
        assert len(r.sites) == 1 and (r.sites[0].q_len, r.sites[0].kv_len) == (q_shape[2], kv_shape[2])
    assert max_rel_err(out, want) <= 1e-5


def test_strict_option_through_torch_compile():
    """options={"strict": True} reaches the backend; the error names the site and the reason."""
    torch._dynamo.reset()
    model = Form(_probs_returned).eval()
    with pytest.raises(Exception, match=r"site 'attention.0' left as it was: the attention probabilities"):
        torch.compile(model, backend="vsopt", options={"strict": True})(*_inputs(H))
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"unknown vsopt option\(s\) \['bogus'\]"):
        torch.compile(model, backend="vsopt", options={"bogus": 1})(*_inputs(H))


def _chained(q, k, v, mask):  # the second attention's queries are the first one's output, directly
    return F.scaled_dot_product_attention(F.scaled_dot_product_attention(q, k, v), k, v)


def test_chained_sites_are_both_rewritten(compile_rewrite):
    model = Form(_chained).eval()
    inputs = _inputs(H)
    out, [(gm, report)] = compile_rewrite(model, *inputs)
    egm, _ = trace_and_rewrite(model, inputs, VsoptConfig())  # torch.export's graph
    for g in (gm, egm):
        assert op_names(g).count("vsopt.attention.default") == 2 and not any("scaled_dot" in o for o in op_names(g))
    assert max_rel_err(out, model(*inputs)) <= 1e-5
