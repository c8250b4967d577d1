"""lower_plan on masked joint sites (issue 14, class 3): a key-padding mask over the text, built in
the graph the way HunyuanVideo builds it, is proved all-true over video x video (passes/mask_bounds),
and the site is split: video x video through block_sparse_attention_lse, text dense under the mask,
merged by LSE. The lowered graph equals semantics.site_output(mask=...) and, for a plan that keeps
every block, SDPA with the mask; masks that cannot be proved stay dense with the reason."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from vsopt.core import semantics
from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.errors import UnsupportedSiteError
from vsopt.core.ir import AttentionSite, GridSource, Layout, TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import Dense, LocalWindow, TemporalDiagonals
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity
from vsopt.passes import PassContext, lower_plan
from vsopt.passes.mask_bounds import video_part_kept

vsopt = torch.ops.vsopt
aten = torch.ops.aten
SCALE = 0.3


def site_for(grid, heads, kv_heads, d=8, batch=2):
    n = grid.num_tokens
    return AttentionSite("blocks.0.attn", 0, "test", Layout.BHND, batch, heads, kv_heads, d, d, n, n, torch.float64,
                         SCALE, has_mask=True, grid=grid, grid_source=GridSource.USER)


def hunyuan_mask(text_mask, video, n):
    """HunyuanVideo's mask: ones(B, N).masked_fill(arange(N) >= video + text_mask.sum(1), False)."""
    valid = video + text_mask.sum(dim=1, dtype=torch.int32)
    idx = torch.arange(n, device=text_mask.device).unsqueeze(0)
    return torch.ones(text_mask.shape[0], n, dtype=torch.bool).masked_fill(idx >= valid.unsqueeze(1), False)[:, None, None]


def lowered(grid, heads, kv_heads, text_dtype=torch.bool, strict=False, dtype=torch.float64, convert=None):
    """convert: what the model does to its text mask input first (e.g. lambda t: t.bool())."""
    site = site_for(grid, len(heads), kv_heads)
    video = grid.video_tokens

    def f(q, k, v, text_mask):
        text_mask = text_mask if convert is None else convert(text_mask)
        return vsopt.attention(q, k, v, hunyuan_mask(text_mask, video, q.shape[2]), SCALE, False) * 2.0

    n = grid.num_tokens
    ex = (torch.randn(2, len(heads), n, 8, dtype=dtype), torch.randn(2, kv_heads, n, 8, dtype=dtype),
          torch.randn(2, kv_heads, n, 8, dtype=dtype), torch.ones(2, grid.text_after, dtype=text_dtype))
    gm = make_fx(f, tracing_mode="fake")(*ex)
    (node,) = [n for n in gm.graph.nodes if n.target is vsopt.attention.default]
    node.meta["vsopt_site"] = site.site_id
    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    ctx = PassContext(config=VsoptConfig(plan=plan, strict=strict), sites=[site])
    report = lower_plan.run(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return gm, site, ctx, report


def inputs(grid, heads, kv_heads, valid, seed):
    g = torch.Generator().manual_seed(seed)
    n = grid.num_tokens
    q = torch.randn(2, heads, n, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, n, 8, generator=g, dtype=torch.float64) for _ in range(2))
    text = torch.zeros(2, grid.text_after, dtype=torch.bool)
    for b, u in enumerate(valid):
        text[b, :u] = True
    return q, k, v, text


def ops_of(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def mixed(bm=16):
    return [HeadPlan(Sparsity.PATTERN, TokenOrder.HWF, pattern=LocalWindow(1, 1, 1), block_m=bm, block_n=bm),
            HeadPlan(Sparsity.DYNAMIC, TokenOrder.WHF, block_m=bm, block_n=bm,
                     dynamic=DynamicSpec(DynamicMethod.CUMULATIVE_MASS, 0.7)),
            HeadPlan(Sparsity.SKIP, block_m=bm, block_n=bm),
            HeadPlan(Sparsity.PATTERN, pattern=TemporalDiagonals(0), block_m=bm, block_n=2 * bm)]


@pytest.mark.parametrize("text_after,valid", [(7, (5, 7)), (13, (1, 12)), (3, (0, 3))])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_masked_joint_site_lowers_and_matches_semantics(text_after, valid, kv_heads):
    grid = TokenGrid(3, 4, 5, text_after=text_after)     # 60 video tokens: ragged blocks
    heads = mixed()
    gm, site, ctx, report = lowered(grid, heads, kv_heads)
    assert ctx.lowered == [site.site_id] and not ctx.skipped
    ops = ops_of(gm)
    assert ops.count(vsopt.block_sparse_attention_lse.default) == 3    # three launch groups
    assert vsopt.block_sparse_attention.default not in ops
    (text_rows,) = [n for n in gm.graph.nodes if n.target is vsopt.attention.default]
    assert text_rows.meta["val"].shape[2] == text_after                # only the text rows stay dense
    assert any("masked joint site, split" in note for note in report.notes)
    q, k, v, text = inputs(grid, len(heads), kv_heads, valid, text_after + kv_heads)
    mask = hunyuan_mask(text, grid.video_tokens, grid.num_tokens)
    want = semantics.site_output(site, heads, q, k, v, SCALE, mask=mask)
    torch.testing.assert_close(gm(q, k, v, text), 2.0 * want.double(), rtol=1e-6, atol=1e-6)   # semantics answers in float32


@pytest.mark.parametrize("text_after,valid", [(5, (2, 5)), (11, (11, 4))])
def test_plan_keeping_every_block_equals_sdpa_with_the_mask(text_after, valid):
    grid = TokenGrid(2, 3, 7, text_after=text_after)
    blocks = -(-grid.num_tokens // 16)    # a calibrated mask covers the whole site; the split cuts the video blocks
    heads = [HeadPlan(Sparsity.PATTERN, TokenOrder.WHF, pattern=Dense(), block_m=16, block_n=16),
             HeadPlan(Sparsity.MASK, TokenOrder.HFW, mask=torch.ones(blocks, blocks, dtype=torch.bool), block_m=16,
                      block_n=16)]
    gm, site, ctx, _ = lowered(grid, heads, 2, dtype=torch.float32)
    assert ctx.lowered == [site.site_id]
    q, k, v, text = inputs(grid, 2, 2, valid, text_after)
    q, k, v = q.float(), k.float(), v.float()     # the split merges in float32
    mask = hunyuan_mask(text, grid.video_tokens, grid.num_tokens)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)
    torch.testing.assert_close(gm(q, k, v, text), 2.0 * want, rtol=1e-5, atol=1e-5)
    # and the sparse plan is not that: a case that must not match
    sparse = [HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 0, 1), block_m=16, block_n=16)] * 2
    gm2, _, _, _ = lowered(grid, sparse, 2, dtype=torch.float32)
    assert (gm2(q, k, v, text) - 2.0 * want).abs().max() > 1e-3


def test_integer_text_mask_cannot_be_proved_and_stays_dense():
    """The sum of an integer mask input could be negative (then video keys would be masked): no
    proof, the site stays dense with the reason; strict mode raises it."""
    grid = TokenGrid(2, 4, 4, text_after=6)
    gm, site, ctx, _ = lowered(grid, mixed(), 4, text_dtype=torch.int64)
    reason = ctx.skipped[0].reason
    assert ctx.lowered == [] and "cannot be proved all-true over video x video" in reason
    assert "non-boolean input(s) 'text_mask" in reason and "mask.bool()" in reason      # what to do about it
    assert vsopt.attention.default in ops_of(gm)
    with pytest.raises(UnsupportedSiteError, match="cannot be proved"):
        lowered(grid, mixed(), 4, text_dtype=torch.int64, strict=True)


CONVERSIONS = {"bool": lambda t: t.bool(), "gt0": lambda t: t > 0, "ne0": lambda t: t != 0,
               "to_bool_then_int": lambda t: t.to(torch.bool).to(torch.int32)}


@pytest.mark.parametrize("convert", sorted(CONVERSIONS))
def test_integer_text_mask_converted_in_the_graph_lowers(convert):
    """An int64 text mask (as tokenizers give) that the model converts to boolean first: the proof
    follows the conversion, the site is split, and equals the meaning of the plan on the mask."""
    grid = TokenGrid(2, 4, 4, text_after=6)
    heads = mixed()
    gm, site, ctx, _ = lowered(grid, heads, 4, text_dtype=torch.int64, convert=CONVERSIONS[convert])
    assert ctx.lowered == [site.site_id] and not ctx.skipped
    q, k, v, text = inputs(grid, len(heads), 4, (2, 6), 3)
    mask = hunyuan_mask(text, grid.video_tokens, grid.num_tokens)
    want = semantics.site_output(site, heads, q, k, v, SCALE, mask=mask)
    torch.testing.assert_close(gm(q, k, v, text.long()), 2.0 * want.double(), rtol=1e-6, atol=1e-6)


def test_mask_bounds_rules():
    """The interval analysis proves what holds and refuses what does not."""
    def prove(f, *ex, start=0, stop=8):
        gm = make_fx(f, tracing_mode="fake")(*ex)
        out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0]
        return video_part_kept(gm, out, start, stop)

    t = torch.ones(2, 4, dtype=torch.bool)
    assert prove(lambda t: (hunyuan_mask(t, 8, 12),), t) is None
    # the same mask over the first 9 tokens is not all-true (token 8 may be padding)
    assert prove(lambda t: (hunyuan_mask(t, 8, 12),), t, stop=9) is not None
    # text before the video: keys [0, 4) masked by the text mask, video [4, 12) always kept
    assert prove(lambda t: (torch.cat([t, torch.ones(2, 8, dtype=torch.bool)], 1)[:, None, None],), t,
                 start=4, stop=12) is None
    assert prove(lambda t: (torch.cat([t, torch.ones(2, 8, dtype=torch.bool)], 1)[:, None, None],), t,
                 start=3, stop=12) is not None
    # additive: (1 - keep) * -10000 with keep all-true over the video is exactly zero there
    add = lambda t: (((1.0 - hunyuan_mask(t, 8, 12).float()) * -10000.0),)   # noqa: E731
    assert prove(add, t) is None
    assert prove(lambda t: (torch.zeros(12, 12).masked_fill(~hunyuan_mask(t, 8, 12)[0, 0], float("-inf")),), t) is None
    # a mask read from data is never proved (and converting it would not help: no .bool() advice)
    why = prove(lambda x: (x > 0,), torch.randn(1, 1, 12, 12))
    assert why is not None and "mask.bool()" not in why
    # integer inputs: converted in the graph, proved; an additive mask from a converted int mask too
    i = torch.ones(2, 4, dtype=torch.int64)
    keep = lambda t: torch.cat([torch.ones(2, 8, dtype=torch.int64), t], 1)[:, None, None]   # noqa: E731
    assert prove(lambda t: (keep(t) > 0,), i) is None
    assert prove(lambda t: (keep(t).bool(),), i) is None
    assert prove(lambda t: ((1.0 - keep(t).float()) * torch.finfo(torch.float32).min,), i) is None
    assert prove(lambda t: (torch.zeros(2, 1, 1, 12).masked_fill(keep(t) == 0, float("-inf")),), i) is None
    # (1 - m) * -inf is NaN (0 * -inf) where m keeps a key: never proved zero
    assert prove(lambda t: ((1.0 - keep(t).float()) * float("-inf"),), i) is not None
