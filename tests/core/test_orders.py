"""Token orders: permutations of the 6 orders of (frame, height, width), text tokens fixed."""
import itertools

import pytest
import torch

import vsopt.core  # noqa: F401  (registers torch.ops.vsopt)
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder, head_permutations, inverse_permutation, order_permutation, token_coordinates

GRIDS = [TokenGrid(1, 1, 1), TokenGrid(2, 3, 5), TokenGrid(3, 4, 2, text_before=3), TokenGrid(4, 1, 3, text_after=2),
         TokenGrid(2, 2, 3, text_before=1, text_after=4)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("order", list(TokenOrder), ids=lambda o: o.value)
def test_permutation_sorts_tokens_by_the_order_axes(grid, order):
    perm = order_permutation(grid, order)
    n = grid.num_tokens
    assert perm.dtype == torch.int64 and perm.shape == (n,)
    assert torch.equal(perm.sort().values, torch.arange(n))
    # text tokens stay where they are
    t0, t1 = grid.text_before, grid.text_before + grid.video_tokens
    assert torch.equal(perm[:t0], torch.arange(t0))
    assert torch.equal(perm[t1:], torch.arange(t1, n))
    # the reordered video tokens are in lexicographic order of (axis order) coordinates
    f, h, w, _ = token_coordinates(grid)
    coords = torch.stack([f, h, w], 1)[perm[t0:t1]][:, list(order.axes)].tolist()
    assert coords == sorted(coords)
    assert len({tuple(c) for c in coords}) == grid.video_tokens


@pytest.mark.parametrize("order", list(TokenOrder), ids=lambda o: o.value)
def test_inverse_and_ops_round_trip(order):
    grid = TokenGrid(3, 2, 4, text_before=2, text_after=1)
    perm = order_permutation(grid, order)
    inv = inverse_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(grid.num_tokens))
    assert torch.equal(inv[perm], torch.arange(grid.num_tokens))
    orders = [order, TokenOrder.HWF, TokenOrder.FHW]
    perms = head_permutations(grid, orders)
    x = torch.randn(2, 3, grid.num_tokens, 5, dtype=torch.float64)
    y = torch.ops.vsopt.permute_tokens(x, perms)
    for h, o in enumerate(orders):
        assert torch.equal(y[:, h], x[:, h, order_permutation(grid, o)])
    assert torch.equal(torch.ops.vsopt.unpermute_tokens(y, perms), x)


def test_known_order_hwf():
    # 2 frames of 1x2: FHW = (f0,w0) (f0,w1) (f1,w0) (f1,w1); HWF puts the same place of both frames together
    grid = TokenGrid(2, 1, 2)
    assert order_permutation(grid, "hwf").tolist() == [0, 2, 1, 3]
    assert order_permutation(grid, TokenOrder.FHW).tolist() == [0, 1, 2, 3]
    assert TokenOrder.FHW.is_identity and not TokenOrder.WHF.is_identity


def test_six_distinct_orders():
    grid = TokenGrid(2, 3, 4)
    perms = {tuple(order_permutation(grid, o).tolist()) for o in TokenOrder}
    assert len(perms) == 6
    assert {o.value for o in TokenOrder} == {"".join(p) for p in itertools.permutations("fhw")}


def test_bad_order_name():
    with pytest.raises(ValueError):
        order_permutation(TokenGrid(1, 2, 2), "xyz")
