"""vsopt.core.metrics against direct float64 computations on small random inputs."""
import math

import pytest
import torch

from vsopt.core.metrics import block_attention_mass, cosine_similarity, psnr, relative_l2, topk_block_share


@pytest.mark.parametrize("nq,nk,bm,bn,chunk", [(37, 45, 8, 16, 16), (64, 64, 16, 16, 1024), (5, 70, 4, 32, 4)])
@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (4, 2)])
def test_block_attention_mass_matches_dense_softmax(nq, nk, bm, bn, chunk, heads, kv_heads):
    g = torch.Generator().manual_seed(nq * 7 + nk)
    q = torch.randn(2, heads, nq, 8, generator=g)
    k = torch.randn(2, kv_heads, nk, 8, generator=g)
    mass = block_attention_mass(q, k, 0.4, bm, bn, query_chunk=chunk)
    kr = k.double().repeat_interleave(heads // kv_heads, dim=1)
    p = torch.softmax(q.double() @ kr.transpose(-1, -2) * 0.4, dim=-1)
    qb, kb = math.ceil(nq / bm), math.ceil(nk / bn)
    expected = torch.zeros(2, heads, qb, kb, dtype=torch.float64)
    for i in range(qb):
        for j in range(kb):
            expected[:, :, i, j] = p[:, :, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].sum(-1).mean(-1)
    torch.testing.assert_close(mass.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, heads, qb), atol=1e-5, rtol=0)


def test_topk_block_share_of_concentrated_and_uniform_maps():
    uniform = torch.full((1, 1, 4, 5), 0.2)
    assert topk_block_share(uniform, 0.2).item() == pytest.approx(0.2)
    peaked = torch.zeros(1, 1, 4, 5)
    peaked[..., 0] = 1.0  # all mass in 4 of 20 blocks
    assert topk_block_share(peaked, 0.2).item() == pytest.approx(1.0)
    assert topk_block_share(peaked, 0.1).item() == pytest.approx(0.5)


def test_errors_and_psnr():
    x = torch.randn(100, dtype=torch.float64)
    assert cosine_similarity(x, x) == pytest.approx(1.0)
    assert cosine_similarity(x, -x) == pytest.approx(-1.0)
    assert relative_l2(x * 1.1, x) == pytest.approx(0.1)
    assert psnr(x, x) == math.inf
    noisy = x + 0.01
    rng = float(x.max() - x.min())
    assert psnr(noisy, x) == pytest.approx(10 * math.log10(rng ** 2 / 1e-4))
