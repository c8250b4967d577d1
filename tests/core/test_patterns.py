"""Static patterns: token-level rules in original coordinates, pooled to blocks in any order;
and the calibrated mask (fewest blocks holding a share of the measured mass)."""
import itertools

import pytest
import torch

from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder, order_permutation, token_coordinates
from vsopt.core.patterns import (Dense, FrameTiles, LocalWindow, Radial, Skip, TemporalDiagonals, Union,
                                 VerticalStripes, block_mask, calibrated_block_mask, diagonal_blocks,
                                 expand_block_mask, pattern_from_dict, token_mask)

PATTERNS = [Dense(), Skip(), LocalWindow(1, 1, 1), LocalWindow(0, 2, 0, text_global=False), TemporalDiagonals(),
            TemporalDiagonals(1, 2, 2), VerticalStripes((0, -1)), Radial(3, 1), Radial(2, 2), FrameTiles(2, 2, 3),
            Union((LocalWindow(0, 1, 1), VerticalStripes((0,), text_global=False)))]
GRIDS = [TokenGrid(3, 4, 5, text_before=3), TokenGrid(4, 3, 3, text_after=5), TokenGrid(5, 2, 7)]


def pool(mask, bm, bn):
    """Reference pooling: block kept iff any token pair in it is kept (ragged tails padded False)."""
    n, m = mask.shape
    qb, kb = -(-n // bm), -(-m // bn)
    p = torch.zeros(qb * bm, kb * bn, dtype=torch.bool)
    p[:n, :m] = mask
    return p.view(qb, bm, kb, bn).any(3).any(1)


def brute_force_token_mask(pattern, grid):
    """Pairwise, in plain Python, from the parameter definitions in the docstrings (FHW order)."""
    f, h, w, video = (t.tolist() for t in token_coordinates(grid))
    n = grid.num_tokens
    out = torch.zeros(n, n, dtype=torch.bool)

    def rule(p, i, j):
        df, dh, dw = abs(f[i] - f[j]), abs(h[i] - h[j]), abs(w[i] - w[j])
        if isinstance(p, Union):
            return any(rule(x, i, j) for x in p.parts)
        if isinstance(p, Dense):
            return True
        if isinstance(p, Skip):
            return False
        if isinstance(p, LocalWindow):
            return df <= p.frames and dh <= p.height and dw <= p.width
        if isinstance(p, TemporalDiagonals):
            return (dh <= p.spatial_radius and dw <= p.spatial_radius and df % p.frame_stride == 0
                    and (p.max_frame_distance is None or df <= p.max_frame_distance))
        if isinstance(p, VerticalStripes):
            return f[j] in {x % grid.frames for x in p.key_frames}
        if isinstance(p, Radial):
            band, r = 0, p.spatial_radius
            while df > p.dense_frames * 2 ** band:
                band += 1
            r = p.spatial_radius // 2 ** band
            return dh <= r and dw <= r
        if isinstance(p, FrameTiles):
            return (f[i] // p.tile_frames == f[j] // p.tile_frames and h[i] // p.tile_height == h[j] // p.tile_height
                    and w[i] // p.tile_width == w[j] // p.tile_width)
        raise AssertionError(p)

    for i in range(n):
        for j in range(n):
            if isinstance(pattern, Skip):
                continue
            keep = i == j or (video[i] and video[j] and rule(pattern, i, j))
            if pattern.text_global and not (video[i] and video[j]):
                keep = True
            out[i, j] = keep
    return out


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.KIND}{PATTERNS.index(p)}")
def test_token_mask_matches_brute_force(pattern):
    grid = TokenGrid(4, 3, 3, text_before=2, text_after=1)
    assert torch.equal(token_mask(pattern, grid), brute_force_token_mask(pattern, grid))


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.KIND}{PATTERNS.index(p)}")
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_block_mask_is_the_pooled_token_mask_in_every_order(pattern, grid):
    base = token_mask(pattern, grid)
    for order, (bm, bn) in zip(TokenOrder, itertools.cycle([(16, 16), (16, 32), (32, 16)])):
        perm = order_permutation(grid, order)
        tm = token_mask(pattern, grid, order)
        assert torch.equal(tm, base[perm][:, perm])  # same pattern, reordered
        bmask = block_mask(pattern, grid, order, bm, bn)
        assert torch.equal(bmask, pool(tm, bm, bn))
        # what block-sparse attention computes covers every kept token pair
        assert bool((expand_block_mask(bmask, grid.num_tokens, grid.num_tokens, bm, bn) | ~tm).all())
        if not isinstance(pattern, Skip) and bm == bn:
            assert bool(bmask.diagonal().all())


def test_temporal_diagonals_are_block_diagonal_in_hwf():
    # 4 frames of 2x2; in HWF order each block of 4 tokens is one place in all 4 frames
    grid = TokenGrid(4, 2, 2)
    m = block_mask(TemporalDiagonals(0), grid, TokenOrder.HWF, 16, 16)
    assert m.shape == (1, 1)
    grid = TokenGrid(16, 2, 2)  # 64 tokens, block 16 = one place over 16 frames
    assert torch.equal(block_mask(TemporalDiagonals(0), grid, "hwf", 16, 16), torch.eye(4, dtype=torch.bool))
    assert block_mask(TemporalDiagonals(0), grid, "fhw", 16, 16).all()  # dense in the model's order


def test_local_window_density_and_skip_dense():
    grid = TokenGrid(8, 4, 4)
    assert not block_mask(Skip(), grid, "fhw", 16, 16).any()
    assert block_mask(Dense(), grid, "whf", 16, 32).all()
    # window of one frame each side: a 16-token block is one frame; frames f-1..f+1
    m = block_mask(LocalWindow(1, 0, 0), grid, "fhw", 16, 16)
    expected = (torch.arange(8)[:, None] - torch.arange(8)[None, :]).abs() <= 1
    assert torch.equal(m, expected)


def test_pattern_dict_round_trip_and_errors():
    for p in PATTERNS:
        assert pattern_from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown pattern kind 'nope'"):
        pattern_from_dict({"kind": "nope"})
    with pytest.raises(ValueError, match="unknown parameter"):
        pattern_from_dict({"kind": "local_window", "radius": 3})
    with pytest.raises(ValueError, match="frames must be an int >= 0"):
        LocalWindow(-1, 1, 1)
    with pytest.raises(ValueError, match="frame_stride"):
        TemporalDiagonals(0, 0)
    with pytest.raises(ValueError, match="block sizes"):
        block_mask(Dense(), TokenGrid(1, 2, 2), "fhw", 0, 16)


def test_diagonal_blocks_ragged_and_rectangular():
    d = diagonal_blocks(40, 40, 16, 32)  # query blocks [0,16) [16,32) [32,40); key blocks [0,32) [32,40)
    assert d.tolist() == [[True, False], [True, False], [False, True]]


@pytest.mark.parametrize("seed", range(4))
def test_calibrated_mask_is_the_fewest_blocks_holding_the_share(seed):
    g = torch.Generator().manual_seed(seed)
    qb = kb = 3
    mass = torch.rand(2, qb, kb, generator=g) ** 3
    mass = mass / mass.sum(-1, keepdim=True)
    share = [0.3, 0.5, 0.8, 0.95][seed]
    got = calibrated_block_mask(mass, share)
    for h in range(2):
        m, total = mass[h], mass[h].sum()
        assert bool(got[h].diagonal().all())
        assert float(m[got[h]].sum()) >= share * float(total) - 1e-6
        # brute force: no mask containing the diagonal with fewer blocks reaches the share
        others = [(i, j) for i in range(qb) for j in range(kb) if i != j]
        best = min(n for n in range(len(others) + 1)
                   if any(float(m.diagonal().sum() + sum(m[i, j] for i, j in c)) >= share * float(total) - 1e-6
                          for c in itertools.combinations(others, n)))
        assert int(got[h].sum()) == qb + best


def test_calibrated_mask_share_one_and_errors():
    mass = torch.rand(4, 5)
    assert calibrated_block_mask(mass, 1.0).all()
    cross = calibrated_block_mask(torch.rand(3, 5), 0.01)  # not square: each row keeps its heaviest block
    assert torch.equal(cross.sum(-1), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="share"):
        calibrated_block_mask(mass, 0.0)
