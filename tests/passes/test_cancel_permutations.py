"""cancel_permutations: consecutive sites in the same token order keep the token-wise ops between
them in that order; the result must equal the graph before the pass exactly (in float64), also
where the pass must NOT cancel (per-head orders, an op that mixes tokens)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vsopt.backend import to_aten, trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity
from vsopt.passes import DEFAULT_PIPELINE, PassContext, cancel_permutations, run_pipeline

vsopt = torch.ops.vsopt
GRID = TokenGrid(2, 3, 4, text_before=2)  # N = 26
C, HEADS = 16, 2


class Block(nn.Module):
    def __init__(self, mix_tokens: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))
        self.mix_tokens = mix_tokens

    def forward(self, x, shift):  # x (B, N, C); shift (B, 1, C): a modulation without a token axis
        B, N, _ = x.shape
        q, k, v = self.qkv(self.norm1(x) * (1 + shift)).view(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + self.proj(a)
        if self.mix_tokens:  # not token-wise: a shift along the token axis
            x = x + 0.5 * torch.roll(x, 1, dims=1)
        return x + self.mlp(F.silu(self.norm2(x)))


class Net(nn.Module):
    def __init__(self, mix_tokens: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([Block(mix_tokens), Block()])
        self.out = nn.Linear(C, 4)

    def forward(self, x, shift):
        for b in self.blocks:
            x = b(x, shift)
        return self.out(x)


def lowered(model, orders, full_pipeline=False):
    """The model's ATen graph after the pipeline up to lower_plan (or the whole pipeline), with one
    HeadPlan per head (orders[h]) at every site."""
    torch.manual_seed(0)
    inputs = (torch.randn(2, GRID.num_tokens, C, dtype=torch.float64),
              torch.randn(2, 1, C, dtype=torch.float64))
    model = model.double().eval()
    _, found = trace_and_rewrite(model, inputs, VsoptConfig(rewrite=True))
    sites = [dataclasses.replace(s, grid=GRID) for s in found.sites]
    heads = [HeadPlan(Sparsity.PATTERN, o, block_m=16, block_n=16, pattern=LocalWindow(0, 1, 1)) for o in orders]
    plan = Plan({s.site_id: SitePlan.for_site(s, heads) for s in sites})
    pipeline = [p for p in DEFAULT_PIPELINE if full_pipeline or p is not cancel_permutations]
    gm = to_aten(model, inputs)
    report = run_pipeline(gm, PassContext(config=VsoptConfig(plan=plan, grid=GRID, strict=True)), pipeline)
    return gm, report, inputs


def count(gm, *targets):
    return sum(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


PERMS = (vsopt.permute_tokens.default, vsopt.unpermute_tokens.default, torch.ops.aten.index_select.default)



@pytest.mark.parametrize("mix_tokens", [False, True], ids=["token-wise", "roll-between"])
def test_same_order_cancels_and_keeps_the_numbers(mix_tokens):
    gm, report, inputs = lowered(Net(mix_tokens), [TokenOrder.HWF] * HEADS)
    expected = gm(*inputs)
    n_before = count(gm, *PERMS)
    assert count(gm, vsopt.permute_tokens.default) == 6 and count(gm, vsopt.unpermute_tokens.default) == 2
    rep = cancel_permutations.run(gm, PassContext(config=VsoptConfig(), sites=report.sites))
    gm.graph.lint()
    gm.recompile()
    torch.testing.assert_close(gm(*inputs), expected, rtol=1e-12, atol=1e-12)
    assert count(gm, *PERMS) < n_before, rep.notes
    if not mix_tokens:
        # the whole stream runs in HWF order: one entry (the input), one exit (before the output layer
        # or after it), every permute_tokens and unpermute_tokens gone
        assert count(gm, vsopt.permute_tokens.default, vsopt.unpermute_tokens.default) == 0, rep.notes
    else:
        roll = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.roll.default)
        # roll reads the stream in the model's order: through an exit, never a permuted value directly
        src = roll.args[0]
        assert src.target is torch.ops.aten.index_select.default or src.op == "placeholder", src.format_node()


def test_per_head_orders_do_not_cancel():
    gm, report, inputs = lowered(Net(), [TokenOrder.HWF, TokenOrder.WHF])
    expected = gm(*inputs)
    graph_before = str(gm.graph)
    rep = cancel_permutations.run(gm, PassContext(config=VsoptConfig(), sites=report.sites))
    assert not rep.changed and str(gm.graph) == graph_before
    torch.testing.assert_close(gm(*inputs), expected, rtol=0, atol=0)


def test_default_pipeline_runs_it():
    gm, _, inputs = lowered(Net(), [TokenOrder.WHF] * HEADS, full_pipeline=True)
    ref, _, _ = lowered(Net(), [TokenOrder.WHF] * HEADS)
    assert count(gm, vsopt.permute_tokens.default, vsopt.unpermute_tokens.default) == 0
    assert count(gm, vsopt.block_sparse_attention.default) == 2
    torch.testing.assert_close(gm(*inputs), ref(*inputs), rtol=1e-12, atol=1e-12)


def test_diffusers_wan_rope_and_modulation():
    """A real model: diffusers' Wan (RoPE written into empty_like slices in place, adaLN modulation
    (B, 1, C), cross-attention to text). The RoPE tables enter once per table, not per slice."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=32).eval().double()
    inputs = (torch.randn(1, 4, 2, 8, 8, dtype=torch.float64), torch.tensor([500]),
              torch.randn(1, 5, 16, dtype=torch.float64))
    _, found = trace_and_rewrite(model, inputs)
    head = HeadPlan(Sparsity.PATTERN, TokenOrder.HWF, block_m=16, block_n=16, pattern=LocalWindow(0, 0, 1))
    plan = Plan.uniform(found.sites, head)  # cross-attention sites stay dense
    outputs, counts = [], []
    for pipeline in ([p for p in DEFAULT_PIPELINE if p is not cancel_permutations], DEFAULT_PIPELINE):
        gm = to_aten(model, inputs)
        run_pipeline(gm, PassContext(config=VsoptConfig(plan=plan)), pipeline)
        outputs.append(gm(*inputs)[0])
        counts.append(count(gm, *PERMS))
    assert counts == [8, 4]  # 6 permutes + 2 unpermutes -> 3 entries (stream, 2 RoPE tables) + 1 exit
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
