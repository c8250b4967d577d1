"""Softmaxes that are not attention are no candidates (issue 14, class 6): a model without
attention passes strict mode, and a model whose only softmax besides its attention is a classifier
head, a keep mask or a product with a weight has exactly its attention as a site, nothing left
alone. Real attentions that cannot be rewritten stay candidates (strict mode raises on them).

Each model runs through both graph levels: torch.compile (Dynamo -> make_fx ATen) and
torch.export (trace_and_rewrite of the module)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.errors import UnsupportedSiteError

from ..conftest import max_rel_err

B, N, DIM, HEADS = 2, 7, 12, 3


class _Attention(nn.Module):
    """Self-attention written out with matmuls (the softmax rule's form), or with SDPA."""

    def __init__(self, sdpa: bool):
        super().__init__()
        self.qkv, self.sdpa = nn.Linear(DIM, 3 * DIM), sdpa

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = (q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v
        return o.transpose(1, 2).reshape(b, n, DIM)


class ClassifierHead(nn.Module):
    """Attention, mean pooling, a linear head without bias and a softmax over the classes: the
    product behind the head's softmax is the attention's own value product, through the pooling."""

    def __init__(self, sdpa: bool):
        super().__init__()
        self.attn = _Attention(sdpa)
        self.head = nn.Linear(DIM, 5, bias=False)

    def forward(self, x):
        return self.head(self.attn(x).mean(1)).softmax(-1)


class ClassifierHeadMatmul(ClassifierHead):
    """The head written as a batched product of the pooled tokens with the weight."""

    def forward(self, x):
        pooled = self.attn(x).mean(1, keepdim=True)                       # (B, 1, DIM)
        return torch.matmul(pooled, self.head.weight.t()).softmax(-1)      # a product, but with a weight


class KeepMask(nn.Module):
    """Token pruning: a softmax of the CLS token's similarity to the tokens (a q @ k^T product),
    thresholded into a keep mask; no attention at all."""

    def forward(self, x):
        cls, tokens = x[:, :1], x[:, 1:]
        p = (cls @ tokens.transpose(1, 2) * DIM ** -0.5).softmax(-1)      # (B, 1, N-1)
        keep = (p > 1.0 / (x.shape[1] - 1)).transpose(1, 2)
        return tokens * keep


class Router(nn.Module):
    """A mixture over a codebook: softmax(x @ W_r^T) @ E with E a weight: a product with values
    follows, but the 'keys' are a weight shared by every sample, not the sample's tokens."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(DIM, 6, bias=False)
        self.codebook = nn.Parameter(torch.randn(6, DIM))

    def forward(self, x):
        return torch.matmul(torch.matmul(x, self.router.weight.t()).softmax(-1), self.codebook)


class AdditivePooling(nn.Module):
    """Attention pooling with a learned scorer: softmax over the tokens of x @ w, then p^T @ x."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(DIM, 1))

    def forward(self, x):
        p = torch.matmul(x, self.w).softmax(1)                             # (B, N, 1)
        return torch.matmul(p.transpose(1, 2), x)                          # (B, 1, DIM)


class NoAttention(nn.Module):
    """An MLP classifier: its only softmax is over class logits."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(DIM, 16), nn.GELU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.mlp(x).softmax(-1)


def _levels(compile_rewrite, model, x, options=None):
    """[(output, report)] at the compile level and the export level."""
    out, [(_, report)] = compile_rewrite(model, x, options=options)
    gm, export_report = trace_and_rewrite(model, (x,), VsoptConfig.from_options(options))
    return [(out, report), (gm(x), export_report)]


CASES = [  # model, number of attention sites
    (lambda: ClassifierHead(sdpa=True), 1), (lambda: ClassifierHead(sdpa=False), 1),
    (lambda: ClassifierHeadMatmul(sdpa=False), 1), (KeepMask, 0), (Router, 0), (AdditivePooling, 0),
    (NoAttention, 0),
]


@pytest.mark.parametrize("make,sites", CASES, ids=["head_sdpa", "head_softmax", "head_matmul", "keep_mask",
                                                   "router", "additive_pooling", "no_attention"])
def test_softmaxes_that_are_not_attention_are_no_candidates(compile_rewrite, make, sites):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(B, N, DIM)
    want = model(x)
    for out, report in _levels(compile_rewrite, model, x, options={"strict": True}):  # strict passes
        assert len(report.sites) == sites, report.sites
        assert report.skipped == [], report.skipped
        assert max_rel_err(out.float(), want.float()) <= 1e-5
    # the pass says why a softmax it saw is not an attention
    _, report = trace_and_rewrite(model, (x,), VsoptConfig())
    notes = [n for p in report.passes if p.name == "detect_attention" for n in p.notes]
    assert any("not an attention" in n for n in notes), notes


class _Clamped(nn.Module):
    """A real attention with an op the rule does not accept between the scores and the softmax."""

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1)).clamp(-3, 3).softmax(-1) @ v


class _LearnedQueries(nn.Module):
    """Cross-attention from learned queries (a pooling head): queries broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, 2, 4))

    def forward(self, q, k, v):
        lat = self.latents.expand(q.shape[0], -1, -1).unsqueeze(1)       # (B, 1, 2, D)
        return (lat @ k.transpose(-2, -1)).softmax(-1) @ v


@pytest.mark.parametrize("make,reason", [(_Clamped, "between the scores and the softmax"),
                                         (_LearnedQueries, "broadcast")])
def test_real_attention_that_cannot_be_rewritten_stays_a_candidate(compile_rewrite, make, reason):
    torch.manual_seed(0)
    model = make().eval()
    q, k, v = (torch.randn(B, 1, N, 4) for _ in range(3))
    out, [(_, report)] = compile_rewrite(model, q, k, v)
    assert report.sites == [] and len(report.skipped) == 1 and reason in report.skipped[0].reason
    assert max_rel_err(out, model(q, k, v)) <= 1e-6
    with pytest.raises(UnsupportedSiteError, match=reason):
        trace_and_rewrite(model, (q, k, v), VsoptConfig(strict=True))
