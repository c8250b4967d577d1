"""Token layouts other than frame-major (TokenGrid.axes, issue 14 class 7): orders, patterns and a
plan's output on a model whose tokens are ordered e.g. (h, w, f) equal the reference built by
explicitly transposing the tokens to frame-major, running the frame-major grid, and transposing
back. And the grid's JSON stays what it was for frame-major grids."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from vsopt.core import semantics
from vsopt.core.ir import TokenGrid, VideoSegment
from vsopt.core.orders import TokenOrder, model_order, order_permutation, token_coordinates
from vsopt.core.patterns import LocalWindow, TemporalDiagonals, Union, VerticalStripes, block_mask, token_mask
from vsopt.core.plan import HeadPlan, SitePlan, Sparsity

AXES = ["".join(p) for p in itertools.permutations("fhw")]
F, H, W, BEFORE, AFTER = 3, 2, 5, 2, 3


def to_frame_major(grid: TokenGrid) -> torch.Tensor:
    """idx (N,): the model's token at frame-major position i is idx[i] (text tokens stay),
    built by transposing an explicit (axes-ordered) index tensor."""
    dims = dict(zip("fhw", (grid.frames, grid.height, grid.width)))
    video = torch.arange(grid.video_tokens).view([dims[c] for c in grid.axes])
    video = video.permute([grid.axes.index(c) for c in "fhw"]).reshape(-1) + grid.text_before
    return torch.cat([torch.arange(grid.text_before), video,
                      torch.arange(grid.text_before + grid.video_tokens, grid.num_tokens)])


@pytest.mark.parametrize("axes", AXES)
def test_coordinates_and_orders_follow_the_layout(axes):
    grid = TokenGrid(F, H, W, BEFORE, AFTER, axes=axes)
    fm = TokenGrid(F, H, W, BEFORE, AFTER)
    idx = to_frame_major(grid)  # model token idx[i] is frame-major token i
    for got, want in zip(token_coordinates(grid), token_coordinates(fm)):
        assert torch.equal(got[idx], want)
    x = torch.randn(grid.num_tokens)  # the model's tokens
    x_fm = x[idx]
    for order in TokenOrder:  # a named order is the same sequence whatever the layout
        assert torch.equal(x[order_permutation(grid, order)], x_fm[order_permutation(fm, order)])
    assert torch.equal(order_permutation(grid, model_order(grid)), torch.arange(grid.num_tokens))
    if axes != "fhw":
        assert not torch.equal(order_permutation(grid, TokenOrder.FHW), torch.arange(grid.num_tokens))


PATTERNS = [LocalWindow(1, 0, 1), TemporalDiagonals(spatial_radius=0), VerticalStripes((0,)),
            Union((LocalWindow(0, 1, 1), VerticalStripes((-1,))), text_global=False)]


@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.KIND)
def test_pattern_masks_equal_the_transposed_reference(axes, pattern):
    grid = TokenGrid(F, H, W, BEFORE, AFTER, axes=axes)
    fm = TokenGrid(F, H, W, BEFORE, AFTER)
    idx = to_frame_major(grid)
    inv = torch.argsort(idx)  # frame-major position of model token j
    want = token_mask(pattern, fm)[inv][:, inv]  # the frame-major mask read at the model's tokens
    assert torch.equal(token_mask(pattern, grid, model_order(grid)), want)
    for order in TokenOrder:
        assert torch.equal(token_mask(pattern, grid, order), token_mask(pattern, fm, order))
        for bm, bn in ((4, 4), (3, 5)):
            assert torch.equal(block_mask(pattern, grid, order, bm, bn), block_mask(pattern, fm, order, bm, bn))


@pytest.mark.parametrize("axes", ["hwf", "wfh"])
def test_site_output_equals_the_transposed_reference(axes):
    """A plan (per-head orders and patterns) on a model with (h, w, f)-ordered tokens: its output
    is the frame-major model's output on the transposed tokens, transposed back."""
    torch.manual_seed(0)
    grid = TokenGrid(4, 4, 5, BEFORE, AFTER, axes=axes)  # 85 tokens, blocks of 16
    fm = TokenGrid(4, 4, 5, BEFORE, AFTER)
    n, b, heads, d = grid.num_tokens, 2, 4, 8
    kw = dict(sparsity=Sparsity.PATTERN, block_m=16, block_n=16)
    plan = [HeadPlan(pattern=LocalWindow(0, 1, 1), order=TokenOrder.FHW, **kw),
            HeadPlan(pattern=TemporalDiagonals(), order=TokenOrder.HWF, **kw),
            HeadPlan(order=TokenOrder(axes), block_m=16, block_n=16),  # the model's own order: dense
            HeadPlan(pattern=VerticalStripes((0,)), order=TokenOrder.WHF, **kw)]
    site = SitePlan.for_site(_site(b, heads, d, n, grid), HeadPlan(block_m=16, block_n=16))
    site_fm = SitePlan.for_site(_site(b, heads, d, n, fm), HeadPlan(block_m=16, block_n=16))
    q, k, v = (torch.randn(b, heads, n, d, dtype=torch.float64) for _ in range(3))
    idx = to_frame_major(grid)
    got = semantics.site_output(site, plan, q, k, v, 0.3)
    want = semantics.site_output(site_fm, plan, q[:, :, idx], k[:, :, idx], v[:, :, idx], 0.3)
    out = torch.empty_like(want)
    out[:, :, idx] = want  # back to the model's order
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    # and the sparse heads are really sparse (the test is not dense everywhere)
    dens = semantics.head_densities(site, plan)
    assert min(dens) < 0.9 and dens == semantics.head_densities(site_fm, plan)


def _site(b, heads, d, n, grid):
    from vsopt.core.ir import AttentionSite, GridSource, Layout
    return AttentionSite("blocks.0.attn", 0, "sdpa", Layout.BHND, b, heads, heads, d, d, n, n, torch.float64,
                         1 / math.sqrt(d), grid=grid, grid_source=GridSource.USER)


def test_model_order_needs_no_permutation_and_other_orders_do():
    grid = TokenGrid(F, H, W, axes="hwf")
    assert semantics.permutations(grid, [HeadPlan(order=TokenOrder.HWF)] * 2) is None
    perm = semantics.permutations(grid, [HeadPlan(order=TokenOrder.FHW)] * 2)
    assert perm is not None and perm.shape == (1, grid.num_tokens)
    assert semantics.permutations(TokenGrid(F, H, W), [HeadPlan()] * 2) is None
    with pytest.raises(Exception, match="option 'grid'"):
        semantics.permutations(None, [HeadPlan(order=TokenOrder.HWF)])


def test_grid_json_is_backward_compatible():
    fm = TokenGrid(F, H, W, 1, 2)
    assert fm.to_dict() == {"frames": F, "height": H, "width": W, "text_before": 1, "text_after": 2}
    assert TokenGrid.from_dict({"frames": F, "height": H, "width": W}) == TokenGrid(F, H, W)  # an older plan
    g = TokenGrid(2, 2, 2, 3, 0, axes="hwf", segments=(VideoSegment(0, 1, 1, 2),))
    assert TokenGrid.from_dict(g.to_dict()) == g and g.to_dict()["axes"] == "hwf"
    assert str(g) == "3+2x2x2(hwf) [also video 1x1x2@0]"
    with pytest.raises(ValueError, match="letters f, h, w"):
        TokenGrid(2, 2, 2, axes="fhh")
    with pytest.raises(ValueError, match="overlaps the main video"):
        TokenGrid(2, 2, 2, 3, 0, segments=(VideoSegment(2, 1, 1, 2),))
