"""torch.ops.vsopt block-sparse ops: opcheck, the CPU (reference) path, errors, compile and export."""
from __future__ import annotations

import pytest
import torch

import vsopt.core  # noqa: F401  (registers the ops)
from vsopt.core.errors import KernelInputError
from vsopt.kernels.block_sparse import reference

from .helpers import block_mask, rel_l2


def _case(seed=0, B=1, Hq=2, Hkv=1, N=40, D=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g)
    k, v = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    mask = block_mask(1, Hq, 3, 3, 0.5, g)
    return q, k, v, mask


@pytest.mark.parametrize("quant", ["none", "int8", "fp8", "int8_fp8"])
def test_opcheck_block_sparse_attention(quant):
    q, k, v, mask = _case()
    idx, cnt = torch.ops.vsopt.mask_to_table(mask)
    args = (q, k, v, idx, cnt, 0.25, 16, 16, quant)
    torch.library.opcheck(torch.ops.vsopt.block_sparse_attention.default, args)
    torch.library.opcheck(torch.ops.vsopt.block_sparse_attention_lse.default, args)


def test_opcheck_helpers():
    q, k, _, mask = _case(1)
    torch.library.opcheck(torch.ops.vsopt.mask_to_table.default, (mask,))
    torch.library.opcheck(torch.ops.vsopt.block_scores.default, (q, k, 0.25, 16, 16))
    scores = torch.ops.vsopt.block_scores(q, k, 0.25, 16, 16)
    torch.library.opcheck(torch.ops.vsopt.topk_block_mask.default, (scores, 1, 16, 16))
    torch.library.opcheck(torch.ops.vsopt.mass_block_mask.default, (scores, 0.5, 16, 16))


def test_cpu_op_is_the_reference_and_dense_table_is_sdpa():
    q, k, v, _ = _case(2, Hkv=2)
    idx, cnt = torch.ops.vsopt.mask_to_table(torch.ones(1, 2, 3, 3, dtype=torch.bool))
    out = torch.ops.vsopt.block_sparse_attention(q.double(), k.double(), v.double(), idx, cnt, 0.25, 16, 16)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.25)
    assert rel_l2(out, want) < 1e-12
    out_lse, lse = torch.ops.vsopt.block_sparse_attention_lse(q, k, v, idx, cnt, 0.25, 16, 16)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, -1))


def test_errors_are_vsopt_errors_naming_the_problem():
    q, k, v, mask = _case(3)
    idx, cnt = torch.ops.vsopt.mask_to_table(mask)
    with pytest.raises(KernelInputError, match="must be int32"):
        torch.ops.vsopt.block_sparse_attention(q, k, v, idx.long(), cnt, 0.25, 16, 16)
    with pytest.raises(KernelInputError, match="table must be"):
        torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, 0.25, 32, 16)   # QB differs
    with pytest.raises(KernelInputError, match="mask must be bool"):
        torch.ops.vsopt.mask_to_table(mask.int())
    with pytest.raises(KernelInputError, match="0 < mass"):
        torch.ops.vsopt.mass_block_mask(torch.rand(1, 1, 2, 2), 1.5, 16, 16)


class _SparseAttention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        scores = torch.ops.vsopt.block_scores(q, k, 0.25, 16, 16)
        dynamic = torch.ops.vsopt.topk_block_mask(scores, 1, 16, 16) | mask
        idx, cnt = torch.ops.vsopt.mask_to_table(dynamic)
        return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, cnt, 0.25, 16, 16, "int8")


def test_torch_compile_and_export_on_cpu_trace_the_ops():
    q, k, v, mask = _case(4)
    model = _SparseAttention()
    eager = model(q, k, v, mask)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(q, k, v, mask)
    torch.testing.assert_close(compiled, eager)
    exported = torch.export.export(model, (q, k, v, mask))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"vsopt.block_sparse_attention.default", "vsopt.mask_to_table.default",
            "vsopt.block_scores.default"} <= targets
    torch.testing.assert_close(exported.module()(q, k, v, mask), eager)


def test_reference_table_expansion():
    idx = torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.int32)
    cnt = torch.tensor([[[1, 2]]], dtype=torch.int32)
    tokens = reference.table_to_token_mask(idx, cnt, nq=3, nk=3, block_m=2, block_n=2)
    assert tokens[0, 0].int().tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 1]]
