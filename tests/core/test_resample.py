"""vsopt.core.resample: a plan entry fitted to a site of another clip size.

resample_mask is checked against a token-level brute force written here (every new token pair
looked up through the axis mapping in the old block mask, then pooled to blocks), on odd grids,
every token order, text, block sizes that do not divide the sequence; and against a pattern
whose meaning at the new grid is known (one-frame tiles at twice the frames are two-frame tiles).
"""
import itertools

import pytest
import torch

from vsopt.core.dynamic import DynamicSpec
from vsopt.core.ir import AttentionSite, Layout, TokenGrid
from vsopt.core.orders import TokenOrder, inverse_permutation, order_permutation, token_coordinates
from vsopt.core.patterns import FrameTiles, LocalWindow, block_mask, diagonal_blocks
from vsopt.core.plan import HeadPlan, SitePlan, Sparsity, StepPlan
from vsopt.core.resample import NOTE_PREFIX, axis_cover, fit_site_plan, resample_mask


def site_at(grid: TokenGrid | None, heads: int = 2, q_len: int | None = None, kv_len: int | None = None):
    n = grid.num_tokens if grid is not None else q_len
    return AttentionSite("s", 0, "sdpa", Layout.BHND, 1, heads, heads, 8, 8, n if q_len is None else q_len,
                         n if kv_len is None else kv_len, torch.float32, 0.35, grid=grid)


@pytest.mark.parametrize("n_old,n_new", [(4, 4), (4, 8), (8, 4), (3, 5), (5, 3), (1, 4), (4, 1), (7, 7)])
def test_axis_cover_is_identity_or_a_partition_without_dilation(n_old, n_new):
    cover = axis_cover(n_old, n_new)
    assert cover.shape == (n_new, n_old)
    assert cover.any(1).all(), "every new cell stands for some old cell"
    assert cover.any(0).all() or n_new < n_old, "growing: every old cell is used"
    if n_old == n_new:
        assert torch.equal(cover, torch.eye(n_new, dtype=torch.bool))
    if n_new >= n_old:
        assert (cover.sum(1) == 1).all(), "growing: one old cell per new cell"
    else:
        assert (cover.sum(0) == 1).all(), "shrinking: each old cell shared out once"
    # monotone: a later new cell never stands for an earlier old cell than its predecessor
    first = cover.float().argmax(1)
    assert (first[1:] >= first[:-1]).all()


def brute_force(mask, old: TokenGrid, new: TokenGrid, order, bm, bn):
    """Token level: new pair (q, k) kept when some old video pair (q', k') q and k stand for
    (axis_cover per axis) lies in a kept old block pair; pooled to new blocks by any; then text
    blocks kept whole and the diagonal kept."""
    covers = [axis_cover(a, b) for a, b in ((old.frames, new.frames), (old.height, new.height),
                                            (old.width, new.width))]
    old_pos = inverse_permutation(order_permutation(old, order))
    new_pos = inverse_permutation(order_permutation(new, order))
    of, oh, ow, ov = token_coordinates(old)
    nf, nh, nw, nv = token_coordinates(new)
    old_video = [t for t in range(old.num_tokens) if ov[t]]
    stands = {}
    for t in range(new.num_tokens):
        if nv[t]:
            stands[t] = [o for o in old_video if covers[0][nf[t], of[o]] and covers[1][nh[t], oh[o]]
                         and covers[2][nw[t], ow[o]]]
    qb, kb = -(-new.num_tokens // bm), -(-new.num_tokens // bn)
    out = torch.zeros(qb, kb, dtype=torch.bool)
    for tq, tk in itertools.product(stands, stands):
        if any(mask[old_pos[a] // bm, old_pos[b] // bn] for a in stands[tq] for b in stands[tk]):
            out[new_pos[tq] // bm, new_pos[tk] // bn] = True
    for t in range(new.num_tokens):
        if not nv[t]:
            out[new_pos[t] // bm, :] = True
            out[:, new_pos[t] // bn] = True
    return out | diagonal_blocks(new.num_tokens, new.num_tokens, bm, bn)


CASES = [  # old grid, new grid, blocks
    (TokenGrid(2, 3, 4), TokenGrid(3, 3, 4), (4, 4)),        # frames
    (TokenGrid(2, 3, 4, text_after=3), TokenGrid(2, 5, 4, text_after=3), (8, 4)),  # height, text
    (TokenGrid(3, 2, 5, text_before=2), TokenGrid(3, 2, 3, text_before=5), (4, 8)),  # width down, text length
    (TokenGrid(2, 4, 4), TokenGrid(3, 5, 3, text_after=2), (16, 16)),  # everything, ragged blocks
]


@pytest.mark.parametrize("old,new,blocks", CASES)
@pytest.mark.parametrize("order", [TokenOrder.FHW, TokenOrder.HWF, TokenOrder.WFH])
def test_resample_mask_equals_the_token_level_brute_force(old, new, blocks, order):
    bm, bn = blocks
    g = torch.Generator().manual_seed(hash((old, new, order)) % 2**31)
    qb, kb = -(-old.num_tokens // bm), -(-old.num_tokens // bn)
    mask = torch.rand(qb, kb, generator=g) < 0.3
    got = resample_mask(mask, old, new, order, bm, bn)
    assert torch.equal(got, brute_force(mask, old, new, order, bm, bn))


def test_resample_mask_at_the_same_grid_keeps_a_mask_with_its_diagonal_and_no_text():
    grid = TokenGrid(3, 4, 4)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 6, generator=g) < 0.3) | torch.eye(6, dtype=torch.bool)
    assert torch.equal(resample_mask(mask, grid, grid, TokenOrder.HWF, 8, 8), mask)


def test_one_frame_tiles_at_twice_the_frames_are_two_frame_tiles():
    old, new = TokenGrid(3, 2, 4), TokenGrid(6, 2, 4)
    frame = 8  # one block = one frame
    mask = block_mask(FrameTiles(1), old, TokenOrder.FHW, frame, frame)
    assert torch.equal(resample_mask(mask, old, new, TokenOrder.FHW, frame, frame),
                       block_mask(FrameTiles(2), new, TokenOrder.FHW, frame, frame))
    # and must NOT be the one-frame tiles of the new grid (the structure scales with the clip)
    assert not torch.equal(resample_mask(mask, old, new, TokenOrder.FHW, frame, frame),
                           block_mask(FrameTiles(1), new, TokenOrder.FHW, frame, frame))


def plan_for(grid: TokenGrid, steps: bool = False) -> SitePlan:
    mask = block_mask(LocalWindow(0, 1, 1), grid, TokenOrder.HWF, 16, 16)
    heads = (HeadPlan(Sparsity.MASK, order=TokenOrder.HWF, block_m=16, block_n=16, mask=mask),
             HeadPlan(Sparsity.PATTERN, order=TokenOrder.WFH, block_m=16, block_n=16, pattern=LocalWindow(1, 1, 1)))
    step = (StepPlan(2, None, (HeadPlan(Sparsity.DYNAMIC, block_m=16, block_n=16, dynamic=DynamicSpec(value=0.5)),
                               HeadPlan(Sparsity.SKIP))),) if steps else ()
    return SitePlan("s", 2, grid.num_tokens, grid.num_tokens, grid, heads, step)


def test_fit_site_plan_resamples_masks_keeps_patterns_orders_and_steps():
    old, new = TokenGrid(2, 8, 8, text_after=3), TokenGrid(3, 8, 10, text_after=5)
    sp = plan_for(old, steps=True)
    fit = fit_site_plan(sp, site_at(new))
    assert fit.reason is None and fit.resampled
    fp = fit.plan
    assert (fp.q_len, fp.kv_len, fp.grid) == (new.num_tokens, new.num_tokens, new)
    mask_head, pattern_head = fp.heads
    assert torch.equal(mask_head.mask, resample_mask(sp.heads[0].mask, old, new, TokenOrder.HWF, 16, 16))
    assert mask_head.order is TokenOrder.HWF and pattern_head == sp.heads[1]
    assert fp.steps[0].heads == sp.steps[0].heads and fp.steps[0].start == 2
    # the density change is reported, with the numbers of both masks
    before, after = float(sp.heads[0].mask.float().mean()), float(mask_head.mask.float().mean())
    assert fit.mask_density == pytest.approx((before, after))
    assert fit.density == pytest.approx((sp.density(), fp.density()))
    line = fit.line()
    assert line.startswith(NOTE_PREFIX) and f"{before:.3f} -> {after:.3f}" in line and "\n" not in line


def test_fit_site_plan_unchanged_when_it_fits():
    grid = TokenGrid(2, 8, 8)
    sp = plan_for(grid)
    fit = fit_site_plan(sp, site_at(grid))
    assert fit.plan is sp and not fit.resampled


def test_dense_and_dynamic_entries_follow_any_length_without_a_grid():
    sp = SitePlan("s", 2, 40, 40, None, (HeadPlan(), HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(value=0.5))))
    fit = fit_site_plan(sp, site_at(None, q_len=57))
    assert fit.plan.heads == sp.heads and fit.plan.q_len == 57 and fit.plan.kv_len == 57


@pytest.mark.parametrize("site,words", [
    (site_at(TokenGrid(3, 8, 8), heads=4), "2 heads, the site 4"),
    (site_at(None, q_len=192), "no video grid"),
    (site_at(None, q_len=192, kv_len=7), "cross-attention"),
])
def test_what_cannot_be_fitted_says_why_in_one_line(site, words):
    fit = fit_site_plan(plan_for(TokenGrid(2, 8, 8)), site)
    assert fit.plan is None and words in fit.reason and "\n" not in fit.line()


def test_a_mask_that_does_not_match_its_own_blocks_is_refused_with_the_reason():
    """A block-size mismatch: the mask was measured with other blocks than the head says (a plan
    assembled by hand past SitePlan's check): it cannot be mapped."""
    grid = TokenGrid(2, 8, 8)
    sp = plan_for(grid)
    bad = HeadPlan(Sparsity.MASK, block_m=16, block_n=16, mask=torch.ones(8, 8, dtype=torch.bool))
    object.__setattr__(bad, "block_m", 32)  # what a hand-edited plan can hold: 8 rows of 16, or 4 of 32?
    object.__setattr__(sp, "heads", (bad, sp.heads[1]))
    fit = fit_site_plan(sp, site_at(TokenGrid(3, 8, 8)))
    assert fit.plan is None and "does not match blocks 32x16" in fit.reason


def test_an_entry_whose_heads_read_no_grid_takes_the_sites_grid():
    """Same length, a grid recorded differently (none at calibration, inferred now): dense and
    dynamic heads do not read it, so the entry fits with the site's grid (not a difference)."""
    sp = SitePlan("s", 2, 128, 128, None, (HeadPlan(), HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(value=0.5))))
    fit = fit_site_plan(sp, site_at(TokenGrid(2, 8, 8)))
    assert fit.plan.grid == TokenGrid(2, 8, 8) and fit.plan.heads == sp.heads and not fit.resampled
