"""inline_dense_attention: a dense site (vsopt.attention) written as ATen SDPA for Inductor gives
bit for bit the op's output in its layout; GQA and soft-capped sites keep the op."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vsopt.passes import inline_dense_attention

vsopt = torch.ops.vsopt
aten = torch.ops.aten


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["plain", "bool_mask", "additive_mask", "causal", "bnhd_view", "cross"])
def test_inlined_dense_sites_equal_the_op(case, dtype):
    g = torch.Generator().manual_seed(hash(case) % 1000)
    B, H, N, M, D = 2, 3, 37, (11 if case == "cross" else 37), 8
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H, M, D, generator=g, dtype=dtype) for _ in range(2))
    mask = None
    if case == "bool_mask":
        mask = torch.rand(B, 1, N, M, generator=g) > 0.3
        mask[..., 0] = True
    elif case == "additive_mask":
        mask = torch.randn(1, H, N, M, generator=g, dtype=dtype)

    def f(q, k, v, *m):
        if case == "bnhd_view":   # the model's (B, N, H, D) projections seen as (B, H, N, D)
            q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        return vsopt.attention(q, k, v, m[0] if m else None, 0.37, case == "causal") * 2.0

    args = (q, k, v) + ((mask,) if mask is not None else ())
    gm = make_fx(f, tracing_mode="fake")(*args)
    before = gm(*args)
    report = inline_dense_attention.run(gm)
    assert vsopt.attention.default not in _targets(gm) and report.changed
    assert aten.scaled_dot_product_attention.default in _targets(gm)
    after = gm(*args)
    assert after.stride() == before.stride() and torch.equal(after, before)


def test_gqa_and_soft_capped_sites_keep_the_op():
    q = torch.randn(1, 4, 16, 8)
    k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    gm = make_fx(lambda q, k, v: vsopt.attention(q, k, v, None, 0.3, False), tracing_mode="fake")(q, k, v)
    assert not inline_dense_attention.run(gm).changed
    gm = make_fx(lambda q, v: vsopt.attention(q, q, v, None, 0.3, False, 5.0), tracing_mode="fake")(q, q)
    assert not inline_dense_attention.run(gm).changed
