"""The block-sparse reference masks scores block by block when the sizes are multiples of the
blocks (no Nq x Nk token mask): bit for bit what masking with the expanded token mask gives (the
formula before the change, written out here), in every mode that path serves: plain, soft cap,
FP8 P rounding, grouped kv heads, a per-batch table, empty rows."""
import pytest
import torch

from vsopt.kernels.block_sparse import reference
from vsopt.kernels.quant import reference as quant_ref


def _token_masked(q, k, v, token_mask, scale, softcap=0.0, p_block=None):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    m = lse[..., None].masked_fill(torch.isinf(lse[..., None]), 0.0)
    p = quant_ref.round_probabilities_fp8(s, m, p_block) if p_block else torch.exp(s - m)
    p = p.masked_fill(~token_mask, 0.0)
    return torch.einsum("bhqk,bhkd->bhqd", p, v), lse


def _table(bt, h, qb, kb, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(bt, h, qb, kb, generator=g) < 0.4
    keep[:, 0, 0] = False  # an empty row
    idx = torch.zeros(bt, h, qb, kb, dtype=torch.int32)
    cnt = keep.sum(-1).to(torch.int32)
    for i in range(bt):
        for j in range(h):
            for r in range(qb):
                cols = keep[i, j, r].nonzero().flatten()
                idx[i, j, r, :len(cols)] = cols.to(torch.int32)
    return idx, cnt


@pytest.mark.parametrize("shape, bt, hkv, softcap, quant", [
    ((1, 2, 64, 96, 16), 1, 2, 0.0, "none"),
    ((2, 4, 48, 32, 8), 2, 2, 0.0, "none"),
    ((1, 2, 64, 64, 16), 1, 1, 5.0, "none"),
    ((2, 2, 32, 48, 16), 1, 2, 0.0, "fp8"),
])
def test_block_masking_equals_the_token_mask(shape, bt, hkv, softcap, quant):
    b, h, nq, nk, d = shape
    bm, bn = 16, 16
    g = torch.Generator().manual_seed(nq + nk)
    q = torch.randn(b, h, nq, d, generator=g)
    k, v = torch.randn(b, hkv, nk, d, generator=g), torch.randn(b, hkv, nk, d, generator=g)
    idx, cnt = _table(bt, h, nq // bm, nk // bn, seed=d)
    out, lse = reference.block_sparse_attention(q, k, v, idx, cnt, 0.3, bm, bn, quant=quant, softcap=softcap)
    mask = reference.table_to_token_mask(idx, cnt, nq, nk, bm, bn).expand(b, -1, -1, -1)
    if quant == "none":
        want, want_lse = _token_masked(q, k, v, mask, 0.3, softcap)
    else:  # the same fake-quantized inputs, then the token-masked formula with FP8 P
        qf, kf, vf = quant_ref.fake_quantize_qkv(q, k, v, reference.QuantMode.parse(quant, "t"), bm, bn, None)
        want, want_lse = _token_masked(qf, kf, vf, mask, 0.3, softcap, p_block=bn)
    assert torch.equal(out, want) and torch.equal(lse, want_lse.float())
    assert torch.all(out[:, 0, :bm] == 0) and torch.all(torch.isinf(lse[:, 0, :bm]))  # the empty row


def test_ragged_sizes_still_take_the_token_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    idx, cnt = _table(1, 2, 3, 3, seed=2)
    out, lse = reference.block_sparse_attention(q, k, v, idx, cnt, 0.5, 16, 16)
    want, want_lse = _token_masked(q, k, v, reference.table_to_token_mask(idx, cnt, 40, 40, 16, 16), 0.5)
    assert torch.equal(out, want) and torch.equal(lse, want_lse.float())
