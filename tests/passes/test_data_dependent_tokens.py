"""Joint attention over a sequence of data-dependent length (issue 14, class 1): the text cut to its
unpadded tokens by a mask (nonzero) and concatenated per head after the video, as diffusers Mochi's
processor does. Under Dynamo's capture of data-dependent shapes the attention is in the graph; the
site is its static part (passes/data_sizes.py: q_len = the video tokens, the grid covers them), and
lower_plan splits it (vsopt.core.joint). Where the data-dependent tokens come before static ones,
their positions depend on the data: no grid, and a plan leaves the site dense with the reason."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from vsopt.backend import trace_and_rewrite
from vsopt.core import semantics
from vsopt.core.config import VsoptConfig
from vsopt.core.errors import UnsupportedSiteError
from vsopt.core.ir import TokenGrid
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity
from vsopt.passes.data_sizes import is_data_dependent, static_part

CAPTURE = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
SPARSE = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16)


class TrimmedJoint(torch.nn.Module):
    """Conv3d patch embedding (2x4x4 tokens), text trimmed by nonzero of the mask, joint SDPA with
    the valid text after the video (or before it: text_first), text output padded back."""

    def __init__(self, text_first=False, dim=16, heads=2):
        super().__init__()
        self.text_first, self.heads = text_first, heads
        self.patch = torch.nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.qkv, self.tqkv = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, 3 * dim)

    def forward(self, clip, text, mask):
        x = self.patch(clip).flatten(2).transpose(1, 2)
        B, N, C = x.shape
        split = lambda t: t.unflatten(2, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # noqa: E731
        q, k, v = split(self.qkv(x))
        tq, tk, tv = split(self.tqkv(text))
        idx = torch.nonzero(mask[0]).flatten()
        pair = (lambda a, b: (b[:, :, idx], a)) if self.text_first else (lambda a, b: (a, b[:, :, idx]))
        qq, kk, vv = (torch.cat(pair(a, b), 2) for a, b in ((q, tq), (k, tk), (v, tv)))
        o = F.scaled_dot_product_attention(qq, kk, vv)
        return F.pad(o, (0, 0, 0, N + text.shape[1] - o.shape[2]))


def inputs(valid, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, :valid] = True
    return torch.randn(1, 3, 2, 8, 8, generator=g), torch.randn(1, 6, 16, generator=g), mask


def compiled(model, config, valid=4):
    """torch.compile under CAPTURE with a backend running the passes (no Inductor: the rewritten ATen
    graph runs as it is); returns (the compiled model, the reports)."""
    reports = []

    def backend(gm, example_inputs):
        out, report = trace_and_rewrite(gm, example_inputs, config)
        reports.append(report)
        return out

    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend, fullgraph=True)
    with torch._dynamo.config.patch(**CAPTURE), torch.no_grad():
        fn(*inputs(valid))
    return fn, reports


def test_static_part_of_sizes():
    env = ShapeEnv()
    u, w = env.create_unbacked_symint(), env.create_unbacked_symint()
    from torch._dynamo.source import ConstantSource

    s = env.create_symintnode(env.create_symbol(5, source=ConstantSource("s")), hint=5)
    assert static_part(7) == 7 and not is_data_dependent(7)
    assert static_part(u + 32) == 32 and is_data_dependent(u + 32)
    assert static_part(2 * u + w + 3) == 3
    assert static_part(u) == 0
    assert static_part(s + 3) is None and not is_data_dependent(s + 3)   # dynamic shapes: not data
    assert static_part(u * s + 1) is None


def test_video_first_site_is_its_static_part_and_lowers_exactly():
    torch.manual_seed(0)
    m = TrimmedJoint().eval()
    _, reports = compiled(m, VsoptConfig())
    (site,) = [s for r in reports for s in r.sites]
    assert (site.q_len, site.kv_len, str(site.grid)) == (32, 32, "2x4x4")
    assert any("data-dependent count" in n for r in reports for p in r.passes for n in p.notes)
    plan = Plan({site.site_id: SitePlan.for_site(site, SPARSE)})
    fn, reports = compiled(m, VsoptConfig(plan=plan, strict=True))
    assert [r.lowered for r in reports] == [[site.site_id]]
    with torch._dynamo.config.patch(**CAPTURE), torch.no_grad():
        for valid in (0, 1, 4, 6):  # one graph: the length is data
            args = inputs(valid, seed=valid)
            got = fn(*args)
            clip, text, mask = args
            x = m.patch(clip).flatten(2).transpose(1, 2)
            split = lambda t: t.unflatten(2, (3, 2, -1)).permute(2, 0, 3, 1, 4)  # noqa: E731
            (q, k, v), (tq, tk, tv) = split(m.qkv(x)), split(m.tqkv(text))
            idx = torch.nonzero(mask[0]).flatten()
            qq, kk, vv = (torch.cat([a, b[:, :, idx]], 2) for a, b in ((q, tq), (k, tk), (v, tv)))
            want = semantics.site_output(site, plan[site.site_id].heads, qq, kk, vv, site.scale, joint=True)
            torch.testing.assert_close(got[:, :, :qq.shape[2]], want, rtol=1e-5, atol=1e-5)
            dense = F.scaled_dot_product_attention(qq, kk, vv)
            assert (want[:, :, :32] - dense[:, :, :32]).abs().max() > 1e-3   # the plan changed the video rows


def test_data_dependent_tokens_before_the_video_give_no_grid_and_stay_dense():
    torch.manual_seed(0)
    m = TrimmedJoint(text_first=True).eval()
    _, reports = compiled(m, VsoptConfig())
    (site,) = [s for r in reports for s in r.sites]
    assert site.grid is None      # the video's position depends on the data: never guessed
    # nor taken from the user: a grid given for the static part would put the video at the wrong place
    grids = {site.site_id: (2, 4, 4)}
    gridded = VsoptConfig.from_options({"grids": grids})
    _, reports = compiled(m, gridded)
    assert reports[0].sites[0].grid is None
    assert any("not proven to come after" in n for p in reports[0].passes for n in p.notes)
    plan = Plan({site.site_id: SitePlan.for_site(dataclasses.replace(site, grid=TokenGrid(2, 4, 4)), SPARSE)})
    fn, reports = compiled(m, VsoptConfig.from_options({"grids": grids, "plan": plan}))
    assert [r.lowered for r in reports] == [[]]
    assert "no video grid" in reports[0].skipped[0].reason
    with pytest.raises(Exception) as e:
        compiled(m, VsoptConfig.from_options({"grids": grids, "plan": plan, "strict": True}))
    assert isinstance(e.value, UnsupportedSiteError) or "no video grid" in str(e.value)
    with torch._dynamo.config.patch(**CAPTURE), torch.no_grad():
        args = inputs(3, seed=3)
        torch.testing.assert_close(fn(*args), m(*args), rtol=1e-5, atol=1e-5)


class ProjectedAfterCat(torch.nn.Module):
    """The valid text cut by nonzero and concatenated with the video before the projections (one
    linear over the joint sequence, then heads): the data-dependent tail goes through a view, the
    linear's matmul, a reshape into heads and a permute before the attention."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.patch = torch.nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def qkv_of(self, clip, text, mask):
        x = torch.cat([self.patch(clip).flatten(2).transpose(1, 2), text[:, torch.nonzero(mask[0]).flatten()]], 1)
        B, N, C = x.shape
        return self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, clip, text, mask):
        q, k, v = self.qkv_of(clip, text, mask)
        return F.scaled_dot_product_attention(q, k, v)


def test_the_data_dependent_tail_is_followed_through_projections():
    torch.manual_seed(0)
    m = ProjectedAfterCat().eval()
    _, reports = compiled(m, VsoptConfig())
    (site,) = [s for r in reports for s in r.sites]
    assert (site.q_len, str(site.grid)) == (32, "2x4x4")
    plan = Plan({site.site_id: SitePlan.for_site(site, SPARSE)})
    fn, reports = compiled(m, VsoptConfig(plan=plan, strict=True))
    assert [r.lowered for r in reports] == [[site.site_id]]
    with torch._dynamo.config.patch(**CAPTURE), torch.no_grad():
        for valid in (0, 3, 6):
            args = inputs(valid, seed=valid)
            q, k, v = m.qkv_of(*args)
            want = semantics.site_output(site, plan[site.site_id].heads, q, k, v, site.scale, joint=True)
            torch.testing.assert_close(fn(*args), want, rtol=1e-5, atol=1e-5)


def test_the_split_compiles_through_inductor_and_matches_the_reference():
    """The real backend (Inductor on the CPU): the text keys are padded to their static bound and the
    video pieces get buffers of their own (Inductor's CPU bmm and its views guard on data-dependent
    sizes and strides otherwise: Eq(u0, 1), Ne(8*u1 + 256, 256)); one graph for every text length."""
    torch.manual_seed(0)
    m = TrimmedJoint().eval()
    _, reports = compiled(m, VsoptConfig())
    (site,) = [s for r in reports for s in r.sites]
    plan = Plan({site.site_id: SitePlan.for_site(site, SPARSE)})
    torch._dynamo.reset()
    fn = torch.compile(m, backend="vsopt", options={"plan": plan, "strict": True})
    with torch._dynamo.config.patch(**CAPTURE), torch.no_grad():
        for valid in (0, 1, 4, 6):
            args = inputs(valid, seed=valid)
            got = fn(*args)
            clip, text, mask = args
            x = m.patch(clip).flatten(2).transpose(1, 2)
            split = lambda t: t.unflatten(2, (3, 2, -1)).permute(2, 0, 3, 1, 4)  # noqa: E731
            (q, k, v), (tq, tk, tv) = split(m.qkv(x)), split(m.tqkv(text))
            idx = torch.nonzero(mask[0]).flatten()
            qq, kk, vv = (torch.cat([a, b[:, :, idx]], 2) for a, b in ((q, tq), (k, tk), (v, tv)))
            want = semantics.site_output(site, plan[site.site_id].heads, qq, kk, vv, site.scale, joint=True)
            torch.testing.assert_close(got[:, :, :qq.shape[2]], want, rtol=1e-4, atol=1e-4)
            assert (want[:, :, :32] - F.scaled_dot_product_attention(qq, kk, vv)[:, :, :32]).abs().max() > 1e-3
