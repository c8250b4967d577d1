"""Grid inference on hand-written video models (issue 14, class 7), through torch.compile's graph
and torch.export's: patchify of channels-last and frame-major-with-channels videos, several
concatenations (CLS, message, history frames, text) behind side branches, tokens ordered
(h, w, f), pre-patchified inputs (the grid comes from the option), and coordinate tables that
look like a video but are not one. Each model: the sites and their grids, compile equal to
eager, strict mode."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.ir import TokenGrid, VideoSegment
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import LocalWindow, TemporalDiagonals
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity

from ..conftest import max_rel_err, op_names

DIM, HEADS = 16, 2


class Block(nn.Module):
    """A pre-norm transformer block with SDPA self-attention."""

    def __init__(self):
        super().__init__()
        self.norm, self.qkv, self.out = nn.LayerNorm(DIM), nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(o.transpose(1, 2).reshape(b, n, DIM))


class Patchify(nn.Module):
    """A linear patch embedding of a 5-D video in one of three layouts (no convolution)."""

    def __init__(self, layout: str, c=3, p=(1, 2, 2)):
        super().__init__()
        self.layout, self.p = layout, p
        self.embed = nn.Linear(c * p[0] * p[1] * p[2], DIM)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, video):
        pf, ph, pw = self.p
        if self.layout == "bcfhw":
            b, c, f, h, w = video.shape
            x = video.reshape(b, c, f // pf, pf, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        elif self.layout == "bfhwc":  # channels last
            b, f, h, w, c = video.shape
            x = video.reshape(b, f // pf, pf, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        else:  # "bfchw": frame-major with channels
            b, f, c, h, w = video.shape
            x = video.reshape(b, f // pf, pf, c, h // ph, ph, w // pw, pw).permute(0, 1, 4, 6, 2, 3, 5, 7)
        x = self.embed(x.reshape(b, (f // pf) * (h // ph) * (w // pw), -1))
        for blk in self.blocks:
            x = blk(x)
        return x


def _check(compile_rewrite, model, inputs, grids, options=None):
    """Sites and grids at both levels, compile == eager, strict mode passes (no candidate left)."""
    torch.manual_seed(0)
    with torch.no_grad():
        want = model(*inputs)
        out, graphs = compile_rewrite(model, *inputs, options=options)
        got = [str(s.grid) for _, r in graphs for s in r.sites]
        assert got == grids, got
        assert max_rel_err(out, want) <= 1e-5
        gm, report = trace_and_rewrite(model, inputs, VsoptConfig.from_options(options))
        assert [str(s.grid) for s in report.sites] == grids
        assert max_rel_err(gm(*inputs), want) <= 1e-5
        trace_and_rewrite(model, inputs, VsoptConfig.from_options({**(options or {}), "strict": True}))
    return report


@pytest.mark.parametrize("layout,shape", [("bcfhw", (1, 3, 3, 4, 6)), ("bfhwc", (2, 3, 4, 6, 3)),
                                          ("bfchw", (1, 3, 3, 4, 6))])
def test_patchify_layouts(compile_rewrite, layout, shape):
    torch.manual_seed(0)
    _check(compile_rewrite, Patchify(layout).eval(), (torch.randn(*shape),), ["3x2x3", "3x2x3"])


def test_patchify_with_a_patch_size_in_time(compile_rewrite):
    torch.manual_seed(0)
    model = Patchify("bfhwc", p=(2, 2, 2)).eval()
    _check(compile_rewrite, model, (torch.randn(1, 4, 4, 6, 3),), ["2x2x3", "2x2x3"])


class ConvTokens(nn.Module):
    """Conv3d patch embedding, tokens in order `axes` (e.g. "hwf": a permute before the flatten),
    then CLS before and a message token after, through two cats, with a side branch: the video
    tokens sliced off (CLS removed), pooled and added to every token."""

    def __init__(self, axes="fhw", cls=True, message=True):
        super().__init__()
        self.axes, self.use_cls, self.use_msg = axes, cls, message
        self.conv = nn.Conv3d(3, DIM, (1, 2, 2), (1, 2, 2))
        self.cls, self.msg = nn.Parameter(torch.randn(1, 1, DIM)), nn.Parameter(torch.randn(1, 1, DIM))
        self.pool = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, video):
        x = self.conv(video)                                      # (B, C, F, H, W)
        b = x.shape[0]
        x = x.permute(0, *(2 + "fhw".index(a) for a in self.axes), 1).flatten(1, 3)  # tokens in self.axes
        if self.use_cls:
            x = torch.cat([self.cls.expand(b, -1, -1), x], 1)
        if self.use_msg:
            x = torch.cat([x, self.msg.expand(b, -1, -1)], 1)
        start = 1 if self.use_cls else 0
        side = self.pool(x[:, start:x.shape[1] - (1 if self.use_msg else 0)].mean(1, keepdim=True))
        x = x + side
        for blk in self.blocks:
            x = blk(x)
        return x


@pytest.mark.parametrize("axes", ["fhw", "hwf", "wfh"])
def test_cls_and_message_tokens_through_a_side_branch(compile_rewrite, axes):
    torch.manual_seed(0)
    model = ConvTokens(axes).eval()
    suffix = "" if axes == "fhw" else f"({axes})"
    report = _check(compile_rewrite, model, (torch.randn(2, 3, 2, 4, 6),), [f"1+2x2x3{suffix}+1"] * 2)
    assert all(s.grid.axes == axes and s.grid_source.value == "inferred" for s in report.sites)


class HistoryWindowText(nn.Module):
    """History frames (their own patch embedding), the current window, then text: three segments,
    two of them video with their own grids."""

    def __init__(self):
        super().__init__()
        self.hist = nn.Conv3d(3, DIM, (1, 2, 2), (1, 2, 2))
        self.cur = nn.Conv3d(3, DIM, (1, 2, 2), (1, 2, 2))
        self.text = nn.Linear(8, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, history, window, text):
        h = self.hist(history).flatten(2).transpose(1, 2)
        w = self.cur(window).flatten(2).transpose(1, 2)
        x = torch.cat([h, w], 1)                                   # a first cat: history + window
        x = torch.cat([x, self.text(text)], 1)                     # then the text
        for blk in self.blocks:
            x = blk(x)
        return x


def test_history_window_and_text(compile_rewrite):
    torch.manual_seed(0)
    inputs = (torch.randn(1, 3, 1, 4, 4), torch.randn(1, 3, 3, 4, 4), torch.randn(1, 5, 8))
    report = _check(compile_rewrite, HistoryWindowText().eval(), inputs, ["4+3x2x2+5 [also video 1x2x2@0]"] * 2)
    assert report.sites[0].grid == TokenGrid(3, 2, 2, 4, 5, segments=(VideoSegment(0, 1, 2, 2),))


class PrePatchified(nn.Module):
    """Tokens given already patchified (B, N, DIM) and a RoPE table built from a (3, F, H, W)
    coordinate grid (and, with `video_like`, a float (B, 3, F, H, W) one): no patch embedding."""

    def __init__(self, fhw=(2, 2, 3), video_like=False):
        super().__init__()
        self.fhw, self.video_like = fhw, video_like
        self.freq = nn.Linear(3, DIM, bias=False)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, tokens):
        f, h, w = self.fhw
        coords = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"))
        if self.video_like:  # a float (B, 3, F, H, W) table, patchified and fed to a linear like a video
            table = coords.float()[None].repeat(tokens.shape[0], 1, 1, 1, 1)
            rope = self.freq(table.reshape(tokens.shape[0], 3, f * h * w).transpose(1, 2))
        else:
            rope = self.freq(coords.reshape(3, -1).t().float())[None]
        x = tokens * torch.cos(rope) + tokens.roll(1, -1) * torch.sin(rope)
        for blk in self.blocks:
            x = blk(x)
        return x


@pytest.mark.parametrize("video_like", [False, True])
def test_pre_patchified_tokens_take_the_grid_option(compile_rewrite, caplog, video_like):
    torch.manual_seed(0)
    model = PrePatchified(video_like=video_like).eval()
    inputs = (torch.randn(2, 12, DIM),)
    with caplog.at_level(logging.INFO, logger="vsopt"):
        _check(compile_rewrite, model, inputs, ["None", "None"])  # a coordinate table is no patch embedding
    msgs = [r.getMessage() for r in caplog.records if "no video grid" in r.getMessage()]
    assert msgs and all("option 'grid'" in m and "{'grid': (frames, height, width)}" in m for m in msgs)
    report = _check(compile_rewrite, model, inputs, ["2x2x3", "2x2x3"], options={"grid": (2, 2, 3)})
    assert {s.grid_source.value for s in report.sites} == {"user"}
    report = _check(compile_rewrite, model, inputs, ["2x2x3(hwf)"] * 2,
                    options={"grid": {"frames": 2, "height": 2, "width": 3, "axes": "hwf"}})


def _plan_for(model, inputs, heads):
    _, found = trace_and_rewrite(model, inputs, VsoptConfig(rewrite=False))
    return Plan({s.site_id: SitePlan.for_site(s, heads) for s in found.sites})


def test_a_plan_on_hwf_tokens_runs_what_it_runs_on_frame_major_tokens(compile_rewrite):
    """The same weights with tokens ordered (h, w, f) and (f, h, w), a plan of sparse patterns in
    named orders: the outputs, brought to one token order, are equal; the plan is not dense."""
    torch.manual_seed(0)
    fhw = ConvTokens("fhw", cls=False, message=False).eval()
    hwf = ConvTokens("hwf", cls=False, message=False).eval()
    hwf.load_state_dict(fhw.state_dict())
    video = torch.randn(1, 3, 4, 8, 8)                        # 4 x 4 x 4 = 64 tokens
    heads = [HeadPlan(Sparsity.PATTERN, TokenOrder.HWF, block_m=16, block_n=16, pattern=TemporalDiagonals(0)),
             HeadPlan(Sparsity.PATTERN, TokenOrder.FHW, block_m=16, block_n=16, pattern=LocalWindow(0, 1, 1))]
    outs = {}
    for name, model in (("fhw", fhw), ("hwf", hwf)):
        plan = _plan_for(model, (video,), heads)
        out, graphs = compile_rewrite(model, video, options={"plan": plan})
        (gm, report), = graphs
        assert len(report.lowered) == 2 and op_names(gm).count("vsopt.block_sparse_attention.default") == 2
        outs[name] = out
    with torch.no_grad():
        dense = fhw(video)
    # hwf's token i is (h, w, f); bring it to frame-major
    f, h, w = 4, 4, 4
    back = outs["hwf"].reshape(1, h, w, f, DIM).permute(0, 3, 1, 2, 4).reshape(1, f * h * w, DIM)
    assert max_rel_err(back, outs["fhw"]) <= 1e-5
    assert max_rel_err(outs["fhw"], dense) > 1e-3  # the patterns did drop pairs


def test_a_convolution_whose_positions_are_not_the_tokens_gives_no_grid(compile_rewrite):
    """A Conv3d with F x H x W = 8 positions and 8 tokens, but the tokens are a raw reshape of its
    (channels, positions) values, not its positions: a coincidence of counts, no grid."""
    class MixedTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 4, (1, 2, 2), (1, 2, 2))    # (B, 4, 2, 2, 2)
            self.up = nn.Linear(4, DIM)
            self.blocks = nn.ModuleList([Block()])

        def forward(self, video):
            x = self.conv(video)
            x = self.up(x.reshape(x.shape[0], 8, 4))           # tokens mix channels and frames
            for blk in self.blocks:
                x = blk(x)
            return x

    torch.manual_seed(0)
    _check(compile_rewrite, MixedTokens().eval(), (torch.randn(1, 3, 2, 4, 4),), ["None"])


class DividedSpaceTime(nn.Module):
    """A per-frame Conv2d patch embedding and divided attention as in TimeSformer: a temporal
    attention over the frames of each position, then a spatial one over a CLS token + each
    frame's patches (the frames go through the batch axis between the two)."""

    def __init__(self, frames=2):
        super().__init__()
        self.t = frames
        self.conv = nn.Conv2d(3, DIM, 2, 2)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.temporal, self.spatial = Block(), Block()

    def forward(self, video):                                  # (B, T, C, H, W)
        b, t = video.shape[:2]
        x = self.conv(video.flatten(0, 1)).flatten(2).transpose(1, 2)      # (B*T, HW, DIM)
        hw = x.shape[1]
        x = x.reshape(b, t, hw, DIM).transpose(1, 2).reshape(b * hw, t, DIM)
        x = self.temporal(x)                                   # (B*HW, T, DIM)
        x = x.reshape(b, hw, t, DIM).transpose(1, 2).reshape(b * t, hw, DIM)
        x = torch.cat([self.cls.expand(b * t, -1, -1), x], 1)
        return self.spatial(x)                                 # (B*T, 1 + HW, DIM)


def test_divided_space_time_gets_the_frames_and_the_one_frame_grids(compile_rewrite):
    """The temporal attention (tokens '(b h w) t', the frame index followed from the per-frame
    convolution's batch) gets T x 1 x 1, the spatial one 1 x H x W."""
    torch.manual_seed(0)
    report = _check(compile_rewrite, DividedSpaceTime().eval(), (torch.randn(2, 2, 3, 4, 6),), ["2x1x1", "1+1x2x3"])
    assert [s.q_len for s in report.sites] == [2, 7]


class FoldedConv3d(nn.Module):
    """A Conv3d video (tokens frame-major, or ordered (h, w, f)) rearranged so that an attention runs
    within each position over the frames, '(b h w) f', or within each frame over its positions,
    '(b f) (h w)': the axes not attended over are folded into the batch."""

    def __init__(self, axes: str):
        super().__init__()
        self.axes = axes
        self.conv = nn.Conv3d(3, DIM, (1, 2, 2), (1, 2, 2))
        self.inner = Block()

    def forward(self, video):
        x = self.conv(video)                                       # (B, C, F, H, W)
        b, f, h, w = x.shape[0], *x.shape[2:]
        x = x.permute(0, *(2 + "fhw".index(a) for a in self.axes), 1).flatten(1, 3)   # (B, tokens, C)
        if self.axes == "hwf":                                     # '(b h w) f'
            x = self.inner(x.reshape(b * h * w, f, DIM))
        else:                                                      # '(b f) (h w)'
            x = self.inner(x.reshape(b * f, h * w, DIM))
        return x


@pytest.mark.parametrize("axes,grid", [("hwf", "3x1x1"), ("fhw", "1x2x3")])
def test_axes_folded_into_the_batch_leave_the_attended_ones(compile_rewrite, axes, grid):
    torch.manual_seed(0)
    _check(compile_rewrite, FoldedConv3d(axes).eval(), (torch.randn(2, 3, 3, 4, 6),), [grid])


def test_a_split_that_is_no_video_axis_gives_no_grid(compile_rewrite):
    """Tokens (f, h, w) = (3, 2, 3) cut into rows of 2 along the flat order: not a video axis, no grid."""
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, DIM, (1, 2, 2), (1, 2, 2))
            self.inner = Block()

        def forward(self, video):
            x = self.conv(video).flatten(2).transpose(1, 2)       # (B, 18, C)
            return self.inner(x.reshape(-1, 2, DIM))

    torch.manual_seed(0)
    _check(compile_rewrite, Rows().eval(), (torch.randn(1, 3, 3, 4, 6),), ["None"])


class DualThenSingleStream(nn.Module):
    """MM-DiT blocks as Flux, SD3 and HunyuanVideo build them: a dual-stream block (video and text
    projected apart, concatenated for the joint attention, split back and added to each stream's
    residual), then a single-stream block (the streams concatenated, one attention, split again at
    the end). The residual add of the video stream meets the video part sliced out of the joint
    sequence: both are the same video tokens, so the single-stream block's joint sequence keeps
    the grid. text_first: the text before the video (Flux), else after it (HunyuanVideo)."""

    def __init__(self, text_first: bool):
        super().__init__()
        self.text_first = text_first
        self.conv = nn.Conv3d(3, DIM, (1, 2, 2), (1, 2, 2))
        self.text = nn.Linear(8, DIM)
        self.qkv_x, self.qkv_c = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, 3 * DIM)
        self.out_x, self.out_c = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.single = Block()

    def _joint(self, x, c):
        return torch.cat([c, x], 1) if self.text_first else torch.cat([x, c], 1)

    def forward(self, video, text):
        x = self.conv(video).flatten(2).transpose(1, 2)         # (B, F*H*W, DIM)
        c = self.text(text)                                      # (B, L, DIM)
        b, n, L = x.shape[0], x.shape[1], c.shape[1]
        qkv = self._joint(self.qkv_x(x), self.qkv_c(c)).reshape(b, n + L, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(*qkv).transpose(1, 2).reshape(b, n + L, DIM)
        ox, oc = (o[:, L:], o[:, :L]) if self.text_first else (o[:, :n], o[:, n:])
        x, c = x + self.out_x(ox), c + self.out_c(oc)             # each stream's residual
        h = self.single(self._joint(x, c))
        return h[:, L:] if self.text_first else h[:, :-L]


@pytest.mark.parametrize("text_first", [False, True])
def test_single_stream_block_keeps_the_dual_stream_grid(compile_rewrite, text_first):
    torch.manual_seed(0)
    grid = "5+2x2x3" if text_first else "2x2x3+5"
    report = _check(compile_rewrite, DualThenSingleStream(text_first).eval(),
                    (torch.randn(1, 3, 2, 4, 6), torch.randn(1, 5, 8)), [grid, grid])
    assert all(s.grid_source.value == "inferred" for s in report.sites)
