"""vsopt.core.ring on one process: rank r's ring output (sub-tables per key piece, LSE merge)
equals rows of semantics.site_output for plans mixing patterns, orders, skips, dynamic and
quantized heads, for aligned and unaligned shards; orders that cross shards are refused."""
from __future__ import annotations

import pytest
import torch

from vsopt.core.dynamic import DynamicSpec
from vsopt.core.errors import ConfigError
from vsopt.core.ir import AttentionSite, Layout, TokenGrid
from vsopt.core.patterns import LocalWindow, TemporalDiagonals, VerticalStripes
from vsopt.core.plan import HeadPlan
from vsopt.core.ring import EagerEmitter, Shards, key_pieces, merge_partials, ring_attention, shard_rows
from vsopt.core.semantics import site_output


def _site(grid: TokenGrid, heads: int, dtype=torch.float32) -> AttentionSite:
    n = grid.num_tokens
    return AttentionSite("blocks.0.attn1", 0, "sdpa", Layout.BHND, 1, heads, heads, 8, 8, n, n, dtype, 8 ** -0.5,
                         grid=grid)


def _heads(dynamic: bool = True) -> list[HeadPlan]:
    b = {"block_m": 16, "block_n": 16}
    heads = [
        HeadPlan(**b),                                                                   # dense
        HeadPlan(sparsity="skip", **b),
        HeadPlan(sparsity="pattern", pattern=LocalWindow(frames=1, height=1, width=1), order="fwh", **b),
        HeadPlan(sparsity="pattern", pattern=TemporalDiagonals(spatial_radius=1), **b),
        HeadPlan(sparsity="pattern", pattern=VerticalStripes(key_frames=(0,)), order="fwh", **b),
    ]
    if dynamic:
        heads.append(HeadPlan(sparsity="dynamic", dynamic=DynamicSpec("top_k", 0.4), order="fwh", **b))
    return heads


def _run_ring(site, heads, R, q, k, v):
    shards = Shards(site.q_len, R)
    em = EagerEmitter("cpu")
    ks = [shard_rows(k, shards, j) for j in range(R)]
    vs = [shard_rows(v, shards, j) for j in range(R)]
    return [ring_attention(site, heads, r, shards, shard_rows(q, shards, r), ks, vs, site.scale, em, f"t{r}")
            for r in range(R)]


@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("grid", [TokenGrid(4, 4, 4), TokenGrid(4, 3, 4)], ids=["aligned", "unaligned"])
def test_ring_equals_one_device(R, grid):
    heads = _heads(dynamic=grid.num_tokens // R % 16 == 0)
    site = _site(grid, len(heads))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, len(heads), grid.num_tokens, 8) for _ in range(3))
    want = site_output(site, heads, q, k, v, site.scale)
    shards = Shards(site.q_len, R)
    for r, (out, lse) in enumerate(_run_ring(site, heads, R, q, k, v)):
        torch.testing.assert_close(out, shard_rows(want, shards, r), rtol=1e-5, atol=1e-5)
        assert torch.isinf(lse[:, 1]).all() and torch.isfinite(lse[:, [0, 2, 3, 4]]).all()


def test_ring_quantized_heads_within_quantization_error():
    grid = TokenGrid(4, 4, 4)
    b = {"block_m": 16, "block_n": 16}
    heads = [HeadPlan(quant="int8", **b), HeadPlan(sparsity="pattern", pattern=TemporalDiagonals(), quant="int8", **b)]
    site = _site(grid, 2)
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, grid.num_tokens, 8) + 0.5 for _ in range(3))
    exact = site_output(site, [HeadPlan(**b), HeadPlan(sparsity="pattern", pattern=TemporalDiagonals(), **b)], q, k, v,
                        site.scale)
    want = site_output(site, heads, q, k, v, site.scale)
    got = torch.cat([out for out, _ in _run_ring(site, heads, 2, q, k, v)], dim=2)
    one_device_err = (want - exact).norm() / exact.norm()
    assert (got - exact).norm() / exact.norm() < 2 * one_device_err + 1e-3   # the smoothing shift is put back
    assert (got - want).norm() / want.norm() < 0.05


def test_orders_that_cross_shards_are_refused():
    grid = TokenGrid(4, 4, 4)
    heads = [HeadPlan(block_m=16, block_n=16),
             HeadPlan(sparsity="pattern", pattern=LocalWindow(), order="hwf", block_m=16, block_n=16)]
    site = _site(grid, 2)
    q = torch.randn(1, 2, grid.num_tokens, 8)
    with pytest.raises(ConfigError, match=r"'blocks.0.attn1': head 1 runs token order 'hwf'.*across the ring shards"):
        _run_ring(site, heads, 2, q, q, q)


def test_dynamic_heads_need_aligned_shards():
    grid = TokenGrid(4, 3, 4)   # 48 tokens: shards of 24 (R=2) straddle 16-token blocks
    heads = [HeadPlan(sparsity="dynamic", dynamic=DynamicSpec("top_k", 0.5), block_m=16, block_n=16)]
    q = torch.randn(1, 1, 48, 8)
    with pytest.raises(ConfigError, match="dynamic head 0 .* multiple of its blocks, got 24 tokens"):
        _run_ring(_site(grid, 1), heads, 2, q, q, q)


def test_key_pieces_cut_at_block_boundaries():
    assert key_pieces(0, 48, 16) == [(0, 48, 0)]
    assert key_pieces(24, 48, 16) == [(24, 32, 1), (32, 48, 2)]
    assert key_pieces(20, 28, 16) == [(20, 28, 1)]


def test_merge_partials_is_attention_over_the_union():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    s = q @ k.transpose(-1, -2)
    want = torch.softmax(s, -1) @ v
    parts = []
    for a, b in ((0, 4), (4, 9)):
        lse = torch.logsumexp(s[..., a:b], -1)
        parts.append((torch.softmax(s[..., a:b], -1) @ v[:, :, a:b], lse))
    empty = (torch.zeros(1, 2, 5, 4), torch.full((1, 2, 5), float("-inf")))
    out, lse = merge_partials(EagerEmitter("cpu"), [empty, *parts, empty])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    out, lse = merge_partials(EagerEmitter("cpu"), [empty, empty])
    assert (out == 0).all() and torch.isinf(lse).all()
