"""Text rows and columns are global in every sparsity kind of a joint site (issue 14, class 4):
static patterns (text_global), calibrated block masks (at calibration and when a plan runs),
dynamic top-k and cumulative-mass masks (semantics, the lowered graph's runtime mask, calibration
measurements)."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vsopt.calibration import CalibrationOptions
from vsopt.calibration.capture import SiteCall
from vsopt.calibration.choices import head_plan
from vsopt.calibration.measure import SiteState, build_candidates, measure_errors, measure_mass
from vsopt.core import semantics
from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.ir import AttentionSite, GridSource, Layout, TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity
from vsopt.passes import PassContext, lower_plan

vsopt = torch.ops.vsopt
GRIDS = [TokenGrid(3, 4, 8, text_before=5), TokenGrid(3, 4, 8, text_after=19), TokenGrid(2, 4, 8, text_before=3,
                                                                                            text_after=7)]


def site_for(grid, heads=2):
    n = grid.num_tokens
    return AttentionSite("blocks.0.attn1", 0, "test", Layout.BHND, 1, heads, heads, 16, 16, n, n, torch.float32, 0.25,
                         grid=grid, grid_source=GridSource.USER)


def text_of(grid, bm=16, bn=16):
    """Independently: block rows / columns holding a text token."""
    n = grid.num_tokens
    pos = [i for i in range(n) if not grid.text_before <= i < grid.text_before + grid.video_tokens]
    out = torch.zeros(-(-n // bm), -(-n // bn), dtype=torch.bool)
    for p in pos:
        out[p // bm] = True
        out[:, p // bn] = True
    return out


def qk(grid, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, grid.num_tokens, 16, generator=g) for _ in range(3)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_every_kind_keeps_text_blocks_in_semantics(grid):
    site = site_for(grid, 4)
    n = grid.num_tokens
    text = text_of(grid)
    assert torch.equal(semantics.text_blocks(grid, n, n, 16, 16), text)
    qb = -(-n // 16)
    heads = [HeadPlan(Sparsity.PATTERN, TokenOrder.HWF, pattern=LocalWindow(0, 0, 1), block_m=16, block_n=16),
             HeadPlan(Sparsity.MASK, TokenOrder.WFH, mask=torch.eye(qb, dtype=torch.bool), block_m=16, block_n=16),
             HeadPlan(Sparsity.DYNAMIC, block_m=16, block_n=16, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.05)),
             HeadPlan(Sparsity.DYNAMIC, TokenOrder.FWH, block_m=16, block_n=16,
                      dynamic=DynamicSpec(DynamicMethod.CUMULATIVE_MASS, 0.05))]
    q, k, _ = qk(grid, 4)
    masks = semantics.head_masks(site, heads, q, k, 0.25)
    for h in range(4):
        assert masks[0, h][text].all(), f"head {h} ({heads[h].sparsity.value}) drops a text block"
        assert not masks[0, h].all()
    # a pattern that asks for it still has no text blocks beyond its own (text_global=False)
    local = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 0, 1, text_global=False), block_m=16, block_n=16)
    assert not semantics.static_mask(site, local)[text].all()


@pytest.mark.parametrize("grid", GRIDS[1:], ids=str)
def test_lowered_dynamic_mask_gets_the_text_blocks(grid):
    site = site_for(grid)
    heads = [HeadPlan(Sparsity.DYNAMIC, block_m=16, block_n=16, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.05))] * 2
    q, k, v = qk(grid, seed=1)
    gm = make_fx(lambda q, k, v: vsopt.attention(q, k, v, None, 0.25, False), tracing_mode="fake")(q, k, v)
    (node,) = [n for n in gm.graph.nodes if n.target is vsopt.attention.default]
    node.meta["vsopt_site"] = site.site_id
    ctx = PassContext(config=VsoptConfig(plan=Plan({site.site_id: SitePlan.for_site(site, heads)})), sites=[site])
    lower_plan.run(gm, ctx)
    gm.recompile()
    ors = [n for n in gm.graph.nodes if n.target is torch.ops.aten.bitwise_or.Tensor]
    assert len(ors) == 1 and torch.equal(getattr(gm, ors[0].args[1].target).cpu(), text_of(grid))
    torch.testing.assert_close(gm(q, k, v).float(), semantics.site_output(site, heads, q, k, v, 0.25), rtol=1e-5,
                               atol=1e-5)


def test_calibration_keeps_text_blocks_in_masks_and_dynamic_measurements():
    grid = TokenGrid(3, 4, 8, text_before=5, text_after=6)
    site = site_for(grid)
    text = text_of(grid)
    q, k, v = qk(grid, seed=2)
    opt = CalibrationOptions(block_m=16, block_n=16, mass_shares=(0.5, 0.9), patterns=True, dynamic=True,
                             dynamic_values=(0.3,), dynamic_top_k=(0.1,), quants=(Quant.NONE,))
    state = SiteState(site, opt, tuple(TokenOrder))
    call = SiteCall(site.site_id, q, k, v, None, 0.25, False, None)
    measure_mass(state, call)
    build_candidates(state)
    masked = [c for c in state.candidates if c.sparsity is Sparsity.MASK]
    assert masked and all(c.masks[:, text].all() for c in masked)
    measure_errors(state, call)
    for c, cand in enumerate(state.candidates):
        if cand.sparsity in (Sparsity.MASK, Sparsity.DYNAMIC):   # measured densities count the text blocks
            assert (state.density[:, c] >= float(text.float().mean()) - 1e-9).all(), cand.label
    # the head plan saved for a calibrated mask keeps them, and so does what it runs
    c = state.candidates.index(masked[0])
    hp = head_plan(state, 0, c, Quant.NONE)
    assert hp.mask[text].all() and semantics.static_mask(site, hp)[text].all()


def test_ring_dynamic_heads_keep_text_blocks_like_one_device():
    from vsopt.core.ring import EagerEmitter, Shards, ring_attention, shard_rows
    grid = TokenGrid(2, 4, 4, text_before=16, text_after=16)     # 64 tokens, 2 shards of 32
    site = site_for(grid)
    heads = [HeadPlan(Sparsity.DYNAMIC, block_m=16, block_n=16, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.1))] * 2
    q, k, v = qk(grid, seed=4)
    want = semantics.site_output(site, heads, q, k, v, 0.25)
    shards = Shards(grid.num_tokens, 2)
    ks, vs = [shard_rows(k, shards, j) for j in range(2)], [shard_rows(v, shards, j) for j in range(2)]
    for r in range(2):
        out, _ = ring_attention(site, heads, r, shards, shard_rows(q, shards, r), ks, vs, 0.25, EagerEmitter("cpu"))
        torch.testing.assert_close(out, shard_rows(want, shards, r), rtol=1e-5, atol=1e-5)
