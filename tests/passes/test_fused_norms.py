"""Norms that stay fused in the ATen graph. On CUDA, torch >= 2.11 keeps RMSNorm as
aten._fused_rms_norm (a tuple: output, rstd) where the CPU decomposes it; the token-segment grid
inference and cancel_permutations must follow it as they follow native_layer_norm. Before this, the
reference model's Q/K RMSNorm hid every site's grid on the GPU and its plan ran dense."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vsopt.backend import to_aten, trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.orders import TokenOrder
from vsopt.passes import PassContext, cancel_permutations

from . import test_cancel_permutations as cp


def fused_rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, 1e-6)[0]


class _PatchifyRms(nn.Module):
    """Patchify (2x2 spatial patches) + text after, Q/K normalized by the fused RMSNorm."""

    def __init__(self, c=2, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(c * 4, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.wq, self.wk = nn.Parameter(torch.rand(dim) + 0.5), nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, latent, text):
        b, c, f, h, w = latent.shape
        x = latent.reshape(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6)
        x = torch.cat([self.embed(x.reshape(b, f * (h // 2) * (w // 2), c * 4)), text], dim=1)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = fused_rms(q, self.wq), fused_rms(k, self.wk)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v)


def test_fused_rms_norm_keeps_the_grid():
    model = _PatchifyRms().eval()
    inputs = (torch.randn(1, 2, 3, 4, 6), torch.randn(1, 5, 16))
    gm = to_aten(model, inputs)
    assert any(n.target is torch.ops.aten._fused_rms_norm.default for n in gm.graph.nodes), \
        "the test needs the fused op in the traced graph"
    _, report = trace_and_rewrite(model, inputs, VsoptConfig())
    assert [(str(s.grid), s.grid_source.value) for s in report.sites] == [("3x2x3+5", "inferred")]


class _RmsBlock(cp.Block):
    """cancel_permutations' block with its first norm as the fused RMSNorm."""

    def __init__(self):
        super().__init__()
        self.norm1 = _FusedRms(cp.C)


class _FusedRms(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return fused_rms(x, self.weight)


class _RmsNet(cp.Net):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_RmsBlock(), _RmsBlock()])


@pytest.mark.parametrize("order", [TokenOrder.HWF, TokenOrder.WHF])
def test_permutations_cancel_through_the_fused_rms_norm(order):
    gm, report, inputs = cp.lowered(_RmsNet(), [order] * cp.HEADS)
    assert cp.count(gm, torch.ops.aten._fused_rms_norm.default) == 2
    expected = gm(*inputs)
    cancel_permutations.run(gm, PassContext(config=VsoptConfig(), sites=report.sites))
    gm.graph.lint()
    gm.recompile()
    torch.testing.assert_close(gm(*inputs), expected, rtol=1e-12, atol=1e-12)
    # the whole stream runs in the plan's order: no permute/unpermute left between the sites
    assert cp.count(gm, torch.ops.vsopt.permute_tokens.default, torch.ops.vsopt.unpermute_tokens.default) == 0
