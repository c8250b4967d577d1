"""Block-mask helpers: mask -> table and block pooling (Triton interpreter), block scores, and the
dynamic top-k / cumulative-mass masks."""
from __future__ import annotations

import pytest
import torch

from vsopt.kernels.block_mask import launch, reference


@pytest.mark.parametrize("shape,density", [((1, 2, 3, 5), 0.5), ((2, 3, 4, 37), 0.3), ((1, 1, 2, 1100), 0.1),
                                           ((1, 2, 3, 7), 0.0), ((1, 2, 3, 7), 1.0)])
def test_mask_to_table_matches_reference(shape, density):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < density
    idx, cnt = launch.mask_to_table(mask)
    ref_idx, ref_cnt = reference.mask_to_table(mask)
    assert torch.equal(cnt, ref_cnt) and torch.equal(idx, ref_idx)
    assert idx.dtype == cnt.dtype == torch.int32
    row = mask[0, 0, 0].nonzero().flatten()
    assert idx[0, 0, 0, : len(row)].tolist() == row.tolist()


@pytest.mark.parametrize("N,block", [(37, 16), (64, 32), (100, 64)])
def test_pool_blocks_means_ragged_tail(N, block):
    x = torch.randn(1, 2, N, 16, generator=torch.Generator().manual_seed(N))
    pooled = launch.pool_blocks(x, block)
    torch.testing.assert_close(pooled, reference.pool_blocks(x, block))
    torch.testing.assert_close(pooled[:, :, -1], x[:, :, (pooled.shape[2] - 1) * block:].mean(2))


def test_block_scores_gqa_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 50, 16, generator=g), torch.randn(1, 2, 50, 16, generator=g)
    s = launch.block_scores(q, k, 0.25, 16, 32)
    assert s.shape == (1, 4, 4, 2)
    torch.testing.assert_close(s, reference.block_scores(q, k, 0.25, 16, 32))
    torch.testing.assert_close(s.sum(-1), torch.ones(1, 4, 4))


def test_topk_mask_keeps_best_blocks_and_diagonal():
    scores = torch.softmax(torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(1)), -1)
    mask = reference.topk_block_mask(scores, 2, 16, 16)
    best = scores.topk(2, -1).indices
    assert mask.gather(-1, best).all()
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    assert ((mask.sum(-1) == 2) | (mask.sum(-1) == 3)).all()


def test_mass_mask_is_the_fewest_blocks_reaching_the_mass():
    scores = torch.softmax(3 * torch.randn(2, 2, 5, 9, generator=torch.Generator().manual_seed(2)), -1)
    diag = reference.diagonal_blocks(5, 9, 16, 16)
    for mass in (0.3, 0.8, 1.0):
        mask = reference.mass_block_mask(scores, mass, 16, 16)
        for b, h, r in torch.cartesian_prod(torch.arange(2), torch.arange(2), torch.arange(5)).tolist():
            row = scores[b, h, r]
            ranked = row.argsort(descending=True)
            fewest = int((row[ranked].cumsum(0) < mass * row.sum() - 1e-7).sum()) + 1   # brute force
            expected = torch.zeros(9, dtype=torch.bool)
            expected[ranked[:min(fewest, 9)]] = True
            expected[diag[r]] = True
            assert torch.equal(mask[b, h, r], expected), (mass, b, h, r)
