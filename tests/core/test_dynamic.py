"""Dynamic masks: pooled block scores, top-k / cumulative-mass selection, reuse across steps."""
import math

import pytest
import torch

from vsopt.core.dynamic import (DynamicMethod, DynamicSpec, MaskReuseCache, pooled_block_scores, select_blocks)
from vsopt.core.metrics import block_attention_mass
from vsopt.core.patterns import diagonal_blocks


def test_pooled_scores_match_block_mass_for_constant_blocks():
    # when q and k are constant within blocks, the pooled estimate is the exact block mass
    g = torch.Generator().manual_seed(0)
    B, H, N, D, blk = 1, 2, 40, 8, 16  # ragged last block (8 tokens)
    qb = torch.randn(B, H, 3, D, generator=g, dtype=torch.float64)
    kb = torch.randn(B, 1, 3, D, generator=g, dtype=torch.float64)
    q = qb.repeat_interleave(blk, 2)[:, :, :N]
    k = kb.repeat_interleave(blk, 2)[:, :, :N]
    got = pooled_block_scores(q, k, 0.5, blk, blk)
    exact = block_attention_mass(q, k, 0.5, blk, blk)
    assert got.shape == (B, H, 3, 3)
    torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(B, H, 3))


@pytest.mark.parametrize("value", [0.1, 0.34, 1.0])
def test_top_k_keeps_k_blocks_per_row_plus_diagonal(value):
    scores = torch.softmax(torch.randn(2, 3, 7, 7), -1)
    diag = diagonal_blocks(100, 100, 16, 16)
    mask = select_blocks(scores, DynamicSpec(DynamicMethod.TOP_K, value), diag)
    k = math.ceil(value * 7)
    top = scores.topk(k, -1).indices
    assert bool(mask.gather(-1, top).all()) and bool(mask[..., diag].all())
    assert bool((mask.sum(-1) <= k + 1).all()) and bool((mask.sum(-1) >= k).all())


@pytest.mark.parametrize("value", [0.3, 0.75, 0.99])
def test_cumulative_mass_is_the_fewest_blocks_reaching_the_share(value):
    scores = torch.softmax(3 * torch.randn(4, 9, 9, dtype=torch.float64), -1)
    mask = select_blocks(scores, DynamicSpec("cumulative_mass", value))
    kept = (scores * mask).sum(-1)
    assert bool((kept >= value - 1e-6).all())
    # dropping the lightest kept block of any row falls below the share
    lightest = scores.masked_fill(~mask, math.inf).min(-1).values
    assert bool((kept - lightest < value).all())


def test_local_heads_are_found_online():
    # keys equal to queries, well separated per block: each query block attends to itself
    g = torch.Generator().manual_seed(1)
    centers = 4 * torch.randn(1, 2, 5, 16, generator=g)
    q = centers.repeat_interleave(8, 2) + 0.01 * torch.randn(1, 2, 40, 16, generator=g)
    mask = torch.ops.vsopt.dynamic_block_mask(q, q, 1.0, 8, 8, "cumulative_mass", 0.9, 0, "")
    assert torch.equal(mask, torch.eye(5, dtype=torch.bool).expand(1, 2, 5, 5))


def test_reuse_across_steps():
    cache = MaskReuseCache()
    calls = []

    def compute():
        calls.append(1)
        return torch.full((2,), len(calls))

    # no step set: every call for a key is a step; reuse_steps=2 computes at steps 0, 3, 6
    got = [int(cache.get("a", 2, (2,), compute)[0]) for _ in range(7)]
    assert got == [1, 1, 1, 2, 2, 2, 3]
    cache.reset()
    calls.clear()
    for step, expected in [(0, 1), (1, 1), (2, 2), (3, 2), (0, 3)]:  # step 0 again: a new generation
        cache.set_step(step)
        assert int(cache.get("b", 1, (2,), compute)[0]) == expected
    assert int(cache.get("b", 1, (3,), compute)[0]) == 4  # another shape recomputes


def test_dynamic_op_opcheck_and_spec_errors():
    q = torch.randn(1, 2, 20, 8)
    k = torch.randn(1, 1, 20, 8)
    torch.library.opcheck(torch.ops.vsopt.dynamic_block_mask.default, (q, k, 0.3, 16, 16, "top_k", 0.5, 0, ""))
    with pytest.raises(ValueError, match="value must be in"):
        DynamicSpec(value=0.0)
    with pytest.raises(ValueError, match="method 'best' is not one of"):
        DynamicSpec("best")
    with pytest.raises(ValueError, match="reuse_steps"):
        DynamicSpec(reuse_steps=-1)
