"""torch.ops.vsopt.attention: exact, and its output layout is the fake's (q's memory layout)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vsopt.core  # noqa: F401  (registers torch.ops.vsopt.*)


def _qkv(dv: int, bnhd: bool):
    g = torch.Generator().manual_seed(dv)
    q = torch.randn(2, 11, 4, 16, generator=g).transpose(1, 2) if bnhd else torch.randn(2, 4, 11, 16, generator=g)
    k = torch.randn(2, 2, 7, 16, generator=g)          # GQA: 4 query heads on 2 kv heads
    v = torch.randn(2, 2, 7, dv, generator=g)
    return q, k, v


@pytest.mark.parametrize("bnhd", [True, False])
@pytest.mark.parametrize("dv", [16, 8])
def test_attention_matches_sdpa_in_the_fakes_layout(dv, bnhd):
    q, k, v = _qkv(dv, bnhd)
    out = torch.ops.vsopt.attention(q, k, v, None, 0.3, False)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1), scale=0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    with FakeTensorMode() as mode:
        fake = torch.ops.vsopt.attention(*(mode.from_tensor(x) for x in (q, k, v)), None, 0.3, False)
    assert out.stride() == fake.stride()
    if dv == 16:
        assert out.stride() == torch.empty_like(q).stride()   # a (B, N, H, D) view stays one
