"""A joint site's mask that the graph cannot prove (a graph input, built in eager code: HunyuanVideo
1.5 after its graph break; issue 14, class 3). Without an option the site stays dense with
mask_bounds' reason (strict: an error). With check_masks_on_device=True the split runs and the
mask's video x video block is checked in the graph by aten._assert_async (no host sync): a mask
that keeps every video pair gives the plan's meaning; one that does not fails the run, never a
silently wrong output."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from vsopt.core import semantics
from vsopt.core.config import VsoptConfig
from vsopt.core.errors import UnsupportedSiteError
from vsopt.core.ir import AttentionSite, GridSource, Layout, TokenGrid
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity
from vsopt.passes import PassContext, lower_plan

vsopt = torch.ops.vsopt
aten = torch.ops.aten
SCALE = 0.3
GRID = TokenGrid(2, 4, 4, text_after=5)   # 32 video tokens, then 5 text
HEADS = [HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16)] * 2


def f(q, k, v, mask):
    return vsopt.attention(q, k, v, mask, SCALE, False) * 2.0


def lowered(mask_shape, dtype=torch.bool, **options):
    n = GRID.num_tokens
    site = AttentionSite("blocks.0.attn", 0, "test", Layout.BHND, 2, 2, 2, 8, 8, n, n, torch.float64, SCALE,
                         has_mask=True, grid=GRID, grid_source=GridSource.USER)
    ex = (*(torch.randn(2, 2, n, 8, dtype=torch.float64) for _ in range(3)), torch.ones(mask_shape, dtype=dtype))
    gm = make_fx(f, tracing_mode="fake")(*ex)
    (node,) = [x for x in gm.graph.nodes if x.target is vsopt.attention.default]
    node.meta["vsopt_site"] = site.site_id
    config = VsoptConfig.from_options({"plan": Plan({site.site_id: SitePlan.for_site(site, HEADS)}), **options})
    ctx = PassContext(config=config, sites=[site])
    report = lower_plan.run(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return gm, site, ctx, report


def qkv(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, GRID.num_tokens, 8, generator=g, dtype=torch.float64) for _ in range(3)]


def padding(valid, shape, dtype=torch.bool):
    """A key-padding mask keeping the video and the first valid[b] text tokens, in `shape`."""
    keep = torch.ones(2, GRID.num_tokens, dtype=torch.bool)
    for b, u in enumerate(valid):
        keep[b, GRID.video_tokens + u:] = False
    m = keep[:, None, None, :].expand(shape).clone() if len(shape) == 4 else keep
    if dtype != torch.bool:
        m = torch.zeros(m.shape, dtype=dtype).masked_fill(~m, float("-inf"))
    return m


def test_an_unprovable_mask_stays_dense_without_the_option():
    gm, site, ctx, _ = lowered((2, 1, 1, GRID.num_tokens))
    assert ctx.lowered == [] and "cannot be proved" in ctx.skipped[0].reason
    with pytest.raises(UnsupportedSiteError):
        lowered((2, 1, 1, GRID.num_tokens), strict=True)


SHAPES = [((2, 1, 1, 37), torch.bool), ((2, 2, 37, 37), torch.bool), ((2, 1, 1, 37), torch.float64)]


@pytest.mark.parametrize("shape,dtype", SHAPES, ids=["key-padding", "full", "additive"])
def test_with_the_option_the_split_runs_checked_on_the_device(shape, dtype):
    gm, site, ctx, report = lowered(shape, dtype, check_masks_on_device=True, strict=True)
    assert ctx.lowered == [site.site_id]
    assert aten._assert_async.msg in [x.target for x in gm.graph.nodes]
    assert any("checked on the device" in n for n in report.notes)
    for seed, valid in enumerate(((5, 2), (0, 3), (1, 5))):
        q, k, v = qkv(seed)
        mask = padding(valid, shape, dtype)
        want = semantics.site_output(site, HEADS, q, k, v, SCALE, mask=mask)
        torch.testing.assert_close(gm(q, k, v, mask), 2.0 * want.to(torch.float64), rtol=1e-6, atol=1e-6)
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)
        assert (want - dense).abs().max() > 1e-3                 # the plan changed the video rows
    bad = padding((5, 5), shape, dtype)
    if dtype == torch.bool:
        bad[..., 3] = False        # a video key masked out: the split would silently ignore it
    else:
        bad[..., 3] = float("-inf")
    with pytest.raises(RuntimeError, match="does not keep every video x video pair"):
        gm(*qkv(9), bad)


def test_the_check_survives_inductor():
    """Inductor keeps the assertion (a side effect) and raises on a bad mask; a good one gives the
    lowered graph's output."""
    from vsopt.inductor import compile_fx

    shape = (2, 1, 1, GRID.num_tokens)
    gm, *_ = lowered(shape, check_masks_on_device=True)
    q, k, v = qkv(0)
    good = padding((5, 2), shape)
    fn = compile_fx(gm, [q, k, v, good])
    first = lambda out: out[0] if isinstance(out, (list, tuple)) else out  # noqa: E731
    torch.testing.assert_close(first(fn(q, k, v, good)), first(gm(q, k, v, good)), rtol=1e-5, atol=1e-5)
    bad = good.clone()
    bad[..., 3] = False
    with pytest.raises(RuntimeError, match="does not keep every video x video pair"):
        fn(q, k, v, bad)


def test_the_option_can_name_the_sites_it_covers():
    """check_masks_on_device=[site ids]: the sites named are split and checked; any other stays
    dense with mask_bounds' reason (strict: an error); a bad value is a one-line ConfigError."""
    from vsopt.core.errors import ConfigError

    shape = (2, 1, 1, GRID.num_tokens)
    gm, site, ctx, _ = lowered(shape, check_masks_on_device=["blocks.0.attn"], strict=True)
    assert ctx.lowered == [site.site_id] and aten._assert_async.msg in [x.target for x in gm.graph.nodes]
    q, k, v = qkv(3)
    mask = padding((2, 4), shape)
    torch.testing.assert_close(gm(q, k, v, mask), 2.0 * semantics.site_output(site, HEADS, q, k, v, SCALE, mask=mask).double(),
                               rtol=1e-6, atol=1e-6)
    _, _, ctx, _ = lowered(shape, check_masks_on_device=["blocks.1.attn"])
    assert ctx.lowered == [] and "cannot be proved" in ctx.skipped[0].reason
    with pytest.raises(UnsupportedSiteError):
        lowered(shape, check_masks_on_device=("blocks.1.attn",), strict=True)
    for bad in ("blocks.0.attn", [0], 1):
        with pytest.raises(ConfigError, match="check_masks_on_device"):
            VsoptConfig.from_options({"check_masks_on_device": bad})
