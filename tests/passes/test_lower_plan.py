"""lower_plan: planned vsopt.attention sites become permute -> block_sparse_attention -> unpermute,
numerically equal to dense attention under the planned block masks (pure PyTorch reference)."""
import copy

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.errors import PlanError, UnsupportedSiteError
from vsopt.core.ir import AttentionSite, GridSource, Layout, TokenGrid
from vsopt.core.orders import TokenOrder, order_permutation
from vsopt.core.patterns import (Dense, FrameTiles, LocalWindow, Radial, Skip, TemporalDiagonals, Union,
                                 VerticalStripes, expand_block_mask)
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity
from vsopt.passes import PassContext, lower_plan

vsopt = torch.ops.vsopt
SCALE = 0.3


def site_for(grid, heads, kv_heads, d=8, sid="blocks.0.attn1", batch=2):
    n = grid.num_tokens
    return AttentionSite(sid, 0, "test", Layout.BHND, batch, heads, kv_heads, d, d, n, n, torch.float64, SCALE,
                         grid=grid, grid_source=GridSource.USER)


def traced(sites):
    """A graph of consecutive vsopt.attention sites (with an elementwise op between), tagged."""
    def f(q, k, v):
        out = q
        for _ in sites:
            out = vsopt.attention(out, k, v, None, SCALE, False) * 2.0
        return out

    return f


def lower(f, inputs, sites, plan, strict=False, meta=None):
    gm = make_fx(f, tracing_mode="fake")(*inputs)
    gm.meta.update(meta or {})
    atts = [n for n in gm.graph.nodes if n.target is vsopt.attention.default]
    for n, s in zip(atts, sites):
        n.meta["vsopt_site"] = s.site_id
    ctx = PassContext(config=VsoptConfig(plan=plan, strict=strict), sites=list(sites))
    report = lower_plan.run(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return gm, report, ctx


def text_blocks_of(grid, n, block_m, block_n):
    """The blocks holding a text row or column (text tokens sit at both ends in every order)."""
    is_text = torch.ones(n, dtype=torch.bool)
    is_text[grid.text_before:grid.text_before + grid.video_tokens] = False
    pos = torch.nonzero(is_text).squeeze(1)
    out = torch.zeros(-(-n // block_m), -(-n // block_n), dtype=torch.bool)
    out[pos // block_m] = True
    out[:, pos // block_n] = True
    return out


def reference(q, k, v, site, heads):
    """Dense attention in float64 with each head's block mask, taken in the head's token order and
    mapped back to the original token positions; rows with no key give 0."""
    B, H, N, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], 1).double()
    v = v.repeat_interleave(H // v.shape[1], 1).double()
    out = torch.zeros(B, H, N, D, dtype=torch.float64)
    for h, hp in enumerate(heads):
        perm = order_permutation(site.grid, hp.order)
        if hp.sparsity is Sparsity.DYNAMIC:
            bm = vsopt.dynamic_block_mask(q[:, h:h + 1, perm], k[:, h:h + 1, perm], SCALE, hp.block_m, hp.block_n,
                                          hp.dynamic.method.value, hp.dynamic.value, 0, "")[:, 0]
        else:
            bm = hp.block_mask(N, N, site.grid)[None]
        if hp.sparsity in (Sparsity.MASK, Sparsity.DYNAMIC):   # text rows and columns global (issue 14, class 4)
            bm = bm | text_blocks_of(site.grid, N, hp.block_m, hp.block_n)
        tok = expand_block_mask(bm, N, N, hp.block_m, hp.block_n)  # (B or 1, N, N) in the permuted order
        orig = torch.zeros_like(tok)
        orig[:, perm[:, None], perm[None, :]] = tok  # back to original positions
        s = (q[:, h].double() @ k[:, h].transpose(-1, -2)) * SCALE
        s = s.masked_fill(~orig, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out[:, h] = p @ v[:, h]
    return out


def ops_of(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


GRID = TokenGrid(3, 4, 5, text_before=3)  # N = 63: ragged blocks
PATTERNS = [LocalWindow(1, 1, 1), TemporalDiagonals(0), VerticalStripes((0,), text_global=False), Radial(2, 1),
            FrameTiles(1, 2, 3), Union((LocalWindow(0, 1, 1), VerticalStripes((-1,)))), Skip(), Dense()]


@pytest.mark.parametrize("order", list(TokenOrder), ids=lambda o: o.value)
def test_every_pattern_in_every_order_matches_the_reference(order):
    g = torch.Generator().manual_seed(list(TokenOrder).index(order))
    heads = [HeadPlan(Sparsity.PATTERN, order, block_m=16, block_n=32 if i % 2 else 16, pattern=p)
             for i, p in enumerate(PATTERNS)]
    site = site_for(GRID, len(heads), len(heads))
    q, k, v = (torch.randn(2, len(heads), GRID.num_tokens, 8, generator=g, dtype=torch.float64) for _ in range(3))
    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    gm, report, _ = lower(traced([site]), (q, k, v), [site], plan)
    ops = ops_of(gm)
    assert vsopt.attention.default not in ops
    assert ops.count(vsopt.block_sparse_attention.default) == 2  # two block shapes: two launches
    assert (vsopt.permute_tokens.default in ops) == (order is not TokenOrder.FHW)
    assert report.removed and report.created
    torch.testing.assert_close(gm(q, k, v), 2.0 * reference(q, k, v, site, heads), rtol=1e-9, atol=1e-9)


def test_mixed_heads_gqa_quant_mask_and_dynamic():
    g = torch.Generator().manual_seed(7)
    grid = TokenGrid(4, 3, 4, text_after=2)  # N = 50
    n = grid.num_tokens
    mask = torch.rand(4, 4, generator=g) > 0.6
    heads = [HeadPlan(Sparsity.MASK, TokenOrder.HWF, block_m=16, block_n=16, mask=mask),
             HeadPlan(Sparsity.PATTERN, TokenOrder.WHF, pattern=TemporalDiagonals(1), block_m=16, block_n=16),
             HeadPlan(Sparsity.DYNAMIC, TokenOrder.HFW, block_m=16, block_n=16,
                      dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.5)),
             HeadPlan(Sparsity.SKIP, block_m=16, block_n=16),
             HeadPlan(Sparsity.DENSE, TokenOrder.WFH, block_m=32, block_n=16),
             HeadPlan(Sparsity.DYNAMIC, block_m=16, block_n=16,
                      dynamic=DynamicSpec(DynamicMethod.CUMULATIVE_MASS, 0.8))]
    site = site_for(grid, 6, 3)
    q = torch.randn(2, 6, n, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for _ in range(2))
    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    gm, _, _ = lower(traced([site]), (q, k, v), [site], plan)
    ops = ops_of(gm)
    assert ops.count(vsopt.block_sparse_attention.default) == 4  # static 16x16, dynamic x2, 32x16
    assert ops.count(vsopt.dynamic_block_mask.default) == 2
    assert torch.ops.aten.repeat_interleave.self_int in ops  # kv heads split across launches
    torch.testing.assert_close(gm(q, k, v), 2.0 * reference(q, k, v, site, heads), rtol=1e-9, atol=1e-9)
    launches = [n for n in gm.graph.nodes if n.target is vsopt.block_sparse_attention.default]
    assert all(n.meta["vsopt_site"] == site.site_id and n.meta["vsopt_from"][0] == "lower_plan" for n in launches)
    assert sorted(h for n in launches for h in n.meta["vsopt_heads"]) == list(range(6))


def test_gqa_same_order_keeps_kv_heads_and_quant_reaches_the_kernel():
    g = torch.Generator().manual_seed(3)
    site = site_for(GRID, 4, 2)
    head = HeadPlan(Sparsity.PATTERN, TokenOrder.HWF, Quant.INT8, 16, 16, pattern=LocalWindow(1, 1, 1))
    q = torch.randn(1, 4, 63, 16, generator=g)
    k, v = (torch.randn(1, 2, 63, 16, generator=g) for _ in range(2))
    plan = Plan({site.site_id: SitePlan.for_site(site, head)})
    gm, _, _ = lower(traced([site]), (q, k, v), [site], plan)
    ops = ops_of(gm)
    assert torch.ops.aten.repeat_interleave.self_int not in ops
    (launch,) = [n for n in gm.graph.nodes if n.target is vsopt.block_sparse_attention.default]
    assert launch.args[-1] == "int8" and launch.meta["vsopt_plan"]["quant"] == "int8"
    perm = getattr(gm, launch.args[0].args[1].target)
    assert perm.shape == (1, 63)  # one order for all heads: one permutation row
    out = gm(q, k, v)
    exact = 2.0 * reference(q, k, v, site, [head] * 4)
    assert torch.nn.functional.cosine_similarity(out.flatten().double(), exact.flatten(), 0) > 0.999


def test_dense_plan_gives_exactly_the_dense_result_and_leaves_the_op():
    g = torch.Generator().manual_seed(1)
    sites = [site_for(GRID, 2, 2), site_for(GRID, 2, 2, sid="blocks.1.attn1")]
    q, k, v = (torch.randn(2, 2, 63, 8, generator=g) for _ in range(3))
    f = traced(sites)
    gm, report, _ = lower(f, (q, k, v), sites, Plan.dense(sites))
    assert ops_of(gm).count(vsopt.attention.default) == 2
    assert not report.changed and len(report.notes) == 2
    assert torch.equal(gm(q, k, v), f(q, k, v))


def test_dense_heads_through_the_kernel_equal_dense_attention():
    g = torch.Generator().manual_seed(2)
    site = site_for(GRID, 2, 2)
    q, k, v = (torch.randn(2, 2, 63, 8, generator=g, dtype=torch.float64) for _ in range(3))
    plan = Plan({site.site_id: SitePlan.for_site(site, HeadPlan(order=TokenOrder.WHF, block_m=16, block_n=16,
                                                                 quant=Quant.NONE, sparsity=Sparsity.PATTERN,
                                                                 pattern=Dense()))})
    gm, _, _ = lower(traced([site]), (q, k, v), [site], plan)
    assert vsopt.block_sparse_attention.default in ops_of(gm)
    torch.testing.assert_close(gm(q, k, v), traced([site])(q, k, v), rtol=1e-12, atol=1e-12)


def test_mismatches_are_reported_or_errors_in_strict_mode():
    g = torch.Generator().manual_seed(4)
    sites = [site_for(GRID, 2, 2), site_for(GRID, 2, 2, sid="blocks.1.attn1")]
    q, k, v = (torch.randn(1, 2, 63, 8, generator=g) for _ in range(3))
    head = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(), block_m=16, block_n=16)
    other = site_for(GRID, 3, 3)  # other head count (another geometry is fitted: tests/core/test_resample.py)
    plan = Plan({other.site_id: SitePlan.for_site(other, head),
                 "blocks.7.attn1": SitePlan.for_site(site_for(GRID, 2, 2, sid="blocks.7.attn1"), head)})
    gm, report, ctx = lower(traced(sites), (q, k, v), sites, plan)
    assert ops_of(gm).count(vsopt.attention.default) == 2  # nothing lowered
    notes = "\n".join(report.notes)
    assert "plan sites not in this graph: ['blocks.7.attn1']" in notes
    reasons = {s.site_id: s.reason for s in ctx.skipped}
    assert "the plan has 3 heads, the site 2" in reasons["blocks.0.attn1"]
    assert reasons["blocks.1.attn1"] == "the plan has no entry for this site"
    with pytest.raises(PlanError, match="plan sites not in this graph"):
        lower(traced(sites), (q, k, v), sites, plan, strict=True)
    fitting = Plan({sites[0].site_id: SitePlan.for_site(sites[0], head)})
    with pytest.raises(UnsupportedSiteError, match="blocks.1.attn1.*no entry"):
        lower(traced(sites), (q, k, v), sites, fitting, strict=True)


def test_masked_site_whose_mask_cannot_be_proved_is_not_lowered():
    """A mask computed from an input's values: nothing proves its video x video part all zero, so
    the site stays dense, with the reason (masked joint sites that can be proved: test_lower_joint)."""
    site = site_for(GRID, 2, 2)
    q, k, v = (torch.randn(1, 2, 63, 8) for _ in range(3))

    def f(q, k, v):
        return vsopt.attention(q, k, v, q[0, 0, :, :1] * 0.0, SCALE, False)

    plan = Plan({site.site_id: SitePlan.for_site(site, HeadPlan(Sparsity.SKIP))})
    gm, _, ctx = lower(f, (q, k, v), [site], plan)
    assert vsopt.attention.default in ops_of(gm)
    assert "cannot be proved zero over video x video" in ctx.skipped[0].reason


# ----------------------------------------------------------------------------- through torch.compile


class TinyDiT(torch.nn.Module):
    """Two pre-norm blocks (qkv, SDPA, projection, MLP) over (B, N, C) tokens: what a video DiT does
    between its patch embedding and its output layer."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.blocks = torch.nn.ModuleList()
        for _ in range(2):
            self.blocks.append(torch.nn.ModuleDict({
                "norm1": torch.nn.LayerNorm(channels), "qkv": torch.nn.Linear(channels, 3 * channels),
                "proj": torch.nn.Linear(channels, channels), "norm2": torch.nn.LayerNorm(channels),
                "mlp": torch.nn.Sequential(torch.nn.Linear(channels, 2 * channels), torch.nn.GELU(),
                                           torch.nn.Linear(2 * channels, channels))}))

    def forward(self, x):
        B, N, C = x.shape
        for b in self.blocks:
            q, k, v = b["qkv"](b["norm1"](x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
            x = x + b["proj"](a)
            x = x + b["mlp"](b["norm2"](x))
        return x


def mixed_heads(block: int) -> list[HeadPlan]:
    """One head of each kind: pattern with INT8, a temporal pattern in another order, a dynamic
    top-k head, a skipped head."""
    return [HeadPlan(Sparsity.PATTERN, TokenOrder.HWF, Quant.INT8, block, block, pattern=LocalWindow(1, 2, 2)),
            HeadPlan(Sparsity.PATTERN, TokenOrder.WHF, block_m=block, block_n=block, pattern=TemporalDiagonals(1)),
            HeadPlan(Sparsity.DYNAMIC, block_m=block, block_n=block, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.3)),
            HeadPlan(Sparsity.SKIP, block_m=block, block_n=block)]


def check_compiled(device: str, dtype: torch.dtype, grid: TokenGrid, channels: int, block: int, tol: float,
                   same_order_too: bool = True):
    """torch.compile(backend="vsopt") with a plan (strict: every site lowered) against the same
    lowered graph run eagerly in float64 on the CPU (the ops' pure-PyTorch references). Returns the
    relative errors of the mixed-head plan and of a same-order plan (which cancel_permutations
    turns into one entry and one exit)."""
    from vsopt.backend import trace_and_rewrite

    heads = 4
    torch.manual_seed(0)
    model = TinyDiT(channels, heads).eval()
    x = torch.randn(1, grid.num_tokens, channels)
    _, found = trace_and_rewrite(model, (x,), VsoptConfig(grid=grid))
    errors = []
    same_order = [HeadPlan(Sparsity.PATTERN, TokenOrder.HWF, Quant.NONE, block, block, pattern=Radial(4, 1))] * heads
    for head_plans in [mixed_heads(block)] + ([same_order] if same_order_too else []):
        plan = Plan({s.site_id: SitePlan.for_site(s, head_plans) for s in found.sites})
        options = {"plan": plan, "grid": grid, "strict": True}
        ref_gm, _ = trace_and_rewrite(copy.deepcopy(model).double(), (x.double(),), VsoptConfig.from_options(options))
        with torch.no_grad():
            want = ref_gm(x.double())
            compiled = torch.compile(copy.deepcopy(model).to(device, dtype), backend="vsopt", options=options)
            got = compiled(x.to(device, dtype)).double().cpu()
        torch._dynamo.reset()
        errors.append(float((got - want).norm() / want.norm()))
        print(f"{device} {dtype}: relative L2 error vs the float64 reference: {errors[-1]:.3e}")
        assert errors[-1] < tol, (head_plans, errors)
    return errors


def test_compiled_plan_on_cpu():
    errors = check_compiled("cpu", torch.float32, TokenGrid(2, 4, 4, text_before=3), 32, 16, tol=1e-2,
                            same_order_too=False)
    assert max(errors) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_plan_on_cuda():
    from vsopt.core.ops import KERNEL_FALLBACKS

    errors = check_compiled("cuda", torch.bfloat16, TokenGrid(4, 16, 16, text_before=7), 256, 64, tol=3e-2)
    assert not KERNEL_FALLBACKS, KERNEL_FALLBACKS  # the Triton kernels ran, not the references
    print("relative L2 error vs float64 reference (mixed heads, same order):", errors)


if __name__ == "__main__":  # on the GPU machine: python3 tests/passes/test_lower_plan.py
    from torch._dynamo.backends.registry import list_backends, register_backend

    if "vsopt" not in list_backends(exclude_tags=()):  # not pip-installed: no entry point
        from vsopt.backend import vsopt_backend

        register_backend(vsopt_backend, "vsopt")
    test_compiled_plan_on_cuda()


def test_strict_mode_takes_plan_sites_of_other_graphs_of_the_model():
    """A model that graph breaks split compiles as several graphs, each holding its own sites: a
    plan site naming a module of the compiled model is a note there, even in strict mode; one naming
    no module of it (another model's plan, a typo) stays an error."""
    from vsopt.passes.site_ids import FRAME_NAMES, FrameNames

    g = torch.Generator().manual_seed(5)
    sites = [site_for(GRID, 2, 2)]
    q, k, v = (torch.randn(1, 2, 63, 8, generator=g) for _ in range(3))
    head = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(), block_m=16, block_n=16)
    plan = Plan({sites[0].site_id: SitePlan.for_site(sites[0], head),
                 "blocks.7.attn1": SitePlan.for_site(site_for(GRID, 2, 2, sid="blocks.7.attn1"), head)})

    def placed(modules):
        return {FRAME_NAMES: FrameNames(root_modules=frozenset(modules))}

    gm, report, _ = lower(traced(sites), (q, k, v), sites, plan, strict=True,
                          meta=placed({"", "blocks", "blocks.0.attn1", "blocks.7", "blocks.7.attn1"}))
    assert vsopt.block_sparse_attention.default in ops_of(gm)
    assert any("['blocks.7.attn1'] name modules of the compiled model" in n for n in report.notes)
    with pytest.raises(PlanError, match="plan sites not in this graph: \\['blocks.7.attn1'\\]"):
        lower(traced(sites), (q, k, v), sites, plan, strict=True, meta=placed({"", "blocks.0.attn1"}))
