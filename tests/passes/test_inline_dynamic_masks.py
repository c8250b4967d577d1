"""inline_dynamic_masks: a dynamic mask computed afresh (vsopt.dynamic_block_mask, reuse_steps 0)
written as torch calls for Inductor gives the op's mask; reused masks keep the op; through
torch.compile(backend="vsopt") the inlined graph samples what the op's graph samples."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import vsopt.core.dynamic as dynamic
from vsopt import inductor
from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.ir import TokenGrid
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity
from vsopt.models import sampler
from vsopt.passes import inline_dynamic_masks

vsopt = torch.ops.vsopt


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("method, value", [("top_k", 0.3), ("top_k", 1.0), ("cumulative_mass", 0.6)])
@pytest.mark.parametrize("shape", [(2, 4, 2, 77, 77, 16, 16), (1, 3, 3, 50, 50, 32, 16), (1, 2, 1, 40, 23, 16, 16)],
                         ids=["gqa_ragged", "unequal_blocks", "cross"])
def test_inlined_masks_equal_the_op(shape, method, value, dtype):
    B, H, Hkv, N, M, bm, bn = shape
    g = torch.Generator().manual_seed(N * 31 + M + int(value * 10))
    q = torch.randn(B, H, N, 16, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, M, 16, generator=g, dtype=dtype)

    def f(q, k):   # a consumer after the mask, as lower_plan's text-block OR and table
        return vsopt.dynamic_block_mask(q, k, 0.25, bm, bn, method, value, 0, "site") | False

    gm = make_fx(f, tracing_mode="fake")(q, k)
    before = gm(q, k)
    report = inline_dynamic_masks.run(gm)
    assert report.changed and vsopt.dynamic_block_mask.default not in _targets(gm)
    assert dynamic.predicted_block_mask in _targets(gm)
    after = gm(q, k)
    assert after.dtype == torch.bool and after.shape == before.shape and torch.equal(after, before)
    assert after.sum() > 0


def test_reused_masks_keep_the_op():
    q, k = torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    gm = make_fx(lambda q, k: vsopt.dynamic_block_mask(q, k, 0.25, 16, 16, "top_k", 0.5, 2, "site"),
                 tracing_mode="fake")(q, k)
    assert not inline_dynamic_masks.run(gm).changed
    assert vsopt.dynamic_block_mask.default in _targets(gm)


C, HEADS, D = 32, 2, 16


class _Toy(torch.nn.Module):
    """One self-attention over the video tokens of Wan-like inputs, then back to latents."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(C, 3 * HEADS * D)
        self.out = torch.nn.Linear(HEADS * D, C)

    def forward(self, x, timestep, encoder_hidden_states, return_dict=False):
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).unflatten(-1, (3, HEADS, D)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return (0.1 * self.out(o.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(x.shape),)


def test_compiled_sampler_with_inlined_masks_matches_the_op(monkeypatch):
    grid = TokenGrid(3, 4, 6)
    torch.manual_seed(0)
    model = _Toy().eval()
    example = (torch.randn(1, C, grid.frames, grid.height, grid.width), torch.tensor([500.0]), torch.randn(1, 3, 8))
    _, report = trace_and_rewrite(model, example, VsoptConfig(grid=grid))
    (site,) = report.sites
    head = HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.4), block_m=16, block_n=16)
    plan = Plan({site.site_id: SitePlan.for_site(site, (head,) * HEADS)})
    changed = []
    real_run = inline_dynamic_masks.run

    def recording(gm, ctx=None):
        rep = real_run(gm, ctx)
        changed.append(rep.changed)
        return rep

    monkeypatch.setattr(inline_dynamic_masks, "run", recording)

    def sample(inline: bool):
        monkeypatch.setattr(inductor, "INLINE_DYNAMIC_MASKS", inline)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="vsopt", options={"plan": plan, "grid": grid})
        with torch.no_grad():
            return sampler.sample(compiled, example[2], (C, grid.frames, grid.height, grid.width), steps=3, seed=3)

    with_op = sample(False)
    assert changed == []
    inlined = sample(True)
    assert changed and all(changed)
    torch.testing.assert_close(inlined, with_op, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        dense = sampler.sample(model, example[2], (C, grid.frames, grid.height, grid.width), steps=3, seed=3)
    assert (inlined - dense).abs().max() > 1e-5   # the mask is sparse: the plan did run
