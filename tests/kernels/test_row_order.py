"""A work order given ahead (row_order: what a compiled graph keeps as a constant for a static
table) runs the same rows: the kernel's output does not depend on it (Triton's interpreter)."""
from __future__ import annotations

import pytest
import torch

from vsopt.kernels.block_mask import reference as mask_ref
from vsopt.kernels.block_sparse import launch, reference
from vsopt.kernels.errors import KernelInputError
from vsopt.kernels.spec import QuantMode

from .helpers import rel_l2


@pytest.mark.parametrize("B,H,N,bm", [(2, 2, 37, 16), (1, 3, 48, 16)])
def test_a_given_row_order_gives_the_same_output(B, H, N, bm):
    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(B, H, N, 16, generator=g) for _ in range(3))
    qb = -(-N // bm)
    mask = torch.rand(1, H, qb, qb, generator=g) > 0.5
    idx, cnt = mask_ref.mask_to_table(mask)
    run = lambda order: launch.run_checked(q, k, v, idx, cnt, 0.25, bm, bm, QuantMode.NONE, row_order=order)[0]  # noqa: E731
    base = run(None)
    ahead = run(launch.work_order(cnt, B))
    backwards = run(launch.work_order(cnt, B).flip(0).contiguous())   # any order of all rows
    assert torch.equal(ahead, base) and torch.equal(backwards, base)
    ref, _ = reference.block_sparse_attention(q, k, v, idx, cnt, 0.25, bm, bm, "none")
    assert rel_l2(base, ref) < 1e-5


def test_a_row_order_of_the_wrong_size_or_type_is_refused():
    q, k, v = (torch.randn(1, 1, 32, 16) for _ in range(3))
    idx, cnt = mask_ref.mask_to_table(torch.ones(1, 1, 2, 2, dtype=torch.bool))
    for bad in (torch.arange(3, dtype=torch.int32), torch.arange(2, dtype=torch.int64)):
        with pytest.raises(KernelInputError, match="row_order"):
            launch.run_checked(q, k, v, idx, cnt, 0.25, 16, 16, QuantMode.NONE, row_order=bad)
