"""Split joint attention (vsopt.core.joint, semantics.site_output with a mask): video x video by
the plan, text rows and keys dense under the model's mask, merged by log-sum-exp; compared with an
independent float64 reference and with SDPA under the mask, at several text paddings, odd sizes."""
import pytest
import torch
import torch.nn.functional as F

from vsopt.core import semantics
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.errors import ConfigError
from vsopt.core.ir import AttentionSite, GridSource, Layout, TokenGrid
from vsopt.core.orders import TokenOrder, order_permutation
from vsopt.core.patterns import LocalWindow, TemporalDiagonals, VerticalStripes, expand_block_mask
from vsopt.core.plan import HeadPlan, Quant, Sparsity

SCALE = 0.35
vsopt = torch.ops.vsopt


def site_for(grid, heads, kv_heads, d=8, batch=2):
    n = grid.num_tokens
    return AttentionSite("blocks.0.attn", 0, "test", Layout.BHND, batch, heads, kv_heads, d, d, n, n, torch.float64,
                         SCALE, has_mask=True, grid=grid, grid_source=GridSource.USER)


def key_padding(batch, grid, valid):
    """Boolean (B, 1, 1, N): every video token and the first valid[b] text tokens after the video
    (text_before tokens always valid)."""
    n = grid.num_tokens
    m = torch.ones(batch, 1, 1, n, dtype=torch.bool)
    for b, u in enumerate(valid):
        m[b, ..., grid.text_before + grid.video_tokens + u:] = False
    return m


def reference(q, k, v, grid, heads, mask):
    """float64: per head, allowed(i, j) = text row or text key, or (video x video) the head's block
    mask on the video grid in its order mapped back; AND the model's mask; skip heads 0."""
    B, H, N, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], 1).double()
    v = v.repeat_interleave(H // v.shape[1], 1).double()
    s0, nv = grid.text_before, grid.video_tokens
    video = TokenGrid(grid.frames, grid.height, grid.width)
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(B, H, N, N)
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for h, hp in enumerate(heads):
        if hp.sparsity is Sparsity.SKIP:
            continue
        perm = order_permutation(video, hp.order)
        qv, kv = q[:, h, s0:s0 + nv][:, perm], k[:, h, s0:s0 + nv][:, perm]
        if hp.sparsity is Sparsity.DYNAMIC:
            bm = vsopt.dynamic_block_mask(qv[:, None], kv[:, None], SCALE, hp.block_m, hp.block_n,
                                          hp.dynamic.method.value, hp.dynamic.value, 0, "")[:, 0]
        elif hp.sparsity is Sparsity.PATTERN:
            bm = hp.block_mask(nv, nv, video)[None]
        elif hp.sparsity is Sparsity.MASK:
            bm = hp.mask[None]
        else:
            bm = torch.ones(1, -(-nv // hp.block_m), -(-nv // hp.block_n), dtype=torch.bool)
        tok = expand_block_mask(bm, nv, nv, hp.block_m, hp.block_n)
        vv = torch.zeros_like(tok)
        vv[:, perm[:, None], perm[None, :]] = tok
        allowed = torch.ones(tok.shape[0], N, N, dtype=torch.bool)
        allowed[:, s0:s0 + nv, s0:s0 + nv] = vv
        s = (q[:, h].double() @ k[:, h].transpose(-1, -2)) * SCALE
        if m4.dtype == torch.bool:
            s = s.masked_fill(~(allowed & m4[:, h]), float("-inf"))
        else:
            s = (s + m4[:, h].double()).masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(s, -1).nan_to_num(0.0) @ v[:, h]
    return out


def mixed_heads(video, bm=16):
    g = torch.Generator().manual_seed(3)
    qb, kb = -(-video.video_tokens // bm), -(-video.video_tokens // bm)
    return [HeadPlan(Sparsity.PATTERN, TokenOrder.HWF, pattern=LocalWindow(1, 1, 1), block_m=bm, block_n=bm),
            HeadPlan(Sparsity.MASK, TokenOrder.WFH, mask=(torch.rand(qb, kb, generator=g) > 0.5) | torch.eye(qb, kb, dtype=torch.bool),
                     block_m=bm, block_n=bm),
            HeadPlan(Sparsity.DYNAMIC, block_m=bm, block_n=bm, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.4)),
            HeadPlan(Sparsity.SKIP, block_m=bm, block_n=bm),
            HeadPlan(Sparsity.PATTERN, pattern=VerticalStripes((0,), text_global=False), block_m=bm, block_n=2 * bm),
            HeadPlan(Sparsity.DENSE, TokenOrder.FWH, block_m=bm, block_n=bm)]


@pytest.mark.parametrize("text_after,valid", [(7, (5, 7)), (4, (0, 3)), (1, (1, 1)), (9, (2, 9))])
@pytest.mark.parametrize("kv_heads", [6, 3])
def test_masked_joint_site_matches_reference(text_after, valid, kv_heads):
    grid = TokenGrid(3, 4, 5, text_after=text_after)   # 60 video tokens: ragged blocks of 16
    heads = mixed_heads(TokenGrid(3, 4, 5))
    site = site_for(grid, 6, kv_heads)
    g = torch.Generator().manual_seed(text_after * 10 + kv_heads)
    n = grid.num_tokens
    q = torch.randn(2, 6, n, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, n, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = key_padding(2, grid, valid)
    got = semantics.site_output(site, heads, q, k, v, SCALE, mask=mask)
    torch.testing.assert_close(got.double(), reference(q, k, v, grid, heads, mask), rtol=1e-5, atol=1e-5)
    assert got[:, 3].abs().max() == 0   # the skipped head
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(6 // kv_heads, 1), v.repeat_interleave(6 // kv_heads, 1),
                                          attn_mask=mask, scale=SCALE)
    assert (got.double() - sdpa).abs().max() > 1e-3   # the plan is sparse: not the dense result


@pytest.mark.parametrize("text_before,text_after", [(16, 0), (32, 5), (0, 0)])
def test_text_before_and_dense_plan_equal_sdpa_with_the_mask(text_before, text_after):
    grid = TokenGrid(3, 3, 5, text_before=text_before, text_after=text_after)
    site = site_for(grid, 2, 2)
    n = grid.num_tokens
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[0, ..., :text_before // 2] = False            # padding in the text before the video
    mask[1, ..., text_before + grid.video_tokens + 1:] = False
    dense = [HeadPlan(block_m=16, block_n=16)] * 2
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)
    got = semantics.site_output(site, dense, q, k, v, SCALE, mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # an additive mask of the same meaning, and a full (B, 1, N, N) one
    add = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(semantics.site_output(site, dense, q, k, v, SCALE, mask=add), want, rtol=1e-5, atol=1e-5)
    full = mask.expand(2, 1, n, n).clone()
    torch.testing.assert_close(semantics.site_output(site, dense, q, k, v, SCALE, mask=full), want, rtol=1e-5, atol=1e-5)
    sparse = [HeadPlan(Sparsity.PATTERN, TokenOrder.HFW, pattern=TemporalDiagonals(0), block_m=16, block_n=16)] * 2
    got = semantics.site_output(site, sparse, q.double(), k.double(), v.double(), SCALE, mask=mask)
    torch.testing.assert_close(got.double(), reference(q, k, v, grid, sparse, mask), rtol=1e-6, atol=1e-6)


def test_quantized_heads_merge_with_the_text_part():
    grid = TokenGrid(2, 4, 4, text_after=5)
    site = site_for(grid, 2, 2)
    n = grid.num_tokens
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    k = k + 3.0    # a large key mean: the smoothing shift must be added back before the merge
    mask = key_padding(1, grid, (3,))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)
    heads = [HeadPlan(block_m=16, block_n=16, quant=Quant.INT8)] * 2
    got = semantics.site_output(site, heads, q, k, v, SCALE, mask=mask)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_a_mask_over_video_tokens_is_refused():
    grid = TokenGrid(2, 4, 4, text_after=3)
    site = site_for(grid, 1, 1)
    q = k = v = torch.randn(1, 1, grid.num_tokens, 8)
    mask = torch.ones(1, 1, 1, grid.num_tokens, dtype=torch.bool)
    mask[..., 2] = False   # a video key
    with pytest.raises(ConfigError, match="not all-true over video x video"):
        semantics.site_output(site, [HeadPlan(block_m=16, block_n=16)], q, k, v, SCALE, mask=mask)


def test_calibrated_and_dynamic_masks_keep_text_global():
    """Class 4 on the unsplit path: a calibrated mask and a dynamic mask of a joint site keep every
    block holding a text row or column."""
    grid = TokenGrid(3, 4, 8, text_before=5, text_after=3)
    n = grid.num_tokens
    site = site_for(grid, 2, 2)
    qb = -(-n // 16)
    text = semantics.text_blocks(grid, n, n, 16, 16)
    assert text is not None and text[0].all() and text[:, 0].all() and text[-1].all() and not text[2, 2]
    empty = torch.eye(qb, dtype=torch.bool)
    heads = [HeadPlan(Sparsity.MASK, mask=empty, block_m=16, block_n=16),
             HeadPlan(Sparsity.DYNAMIC, block_m=16, block_n=16, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.01))]
    q, k = (torch.randn(2, 2, n, 8) for _ in range(2))
    masks = semantics.head_masks(site, heads, q, k, SCALE)
    for h in range(2):
        assert (masks[:, h] >= text).all()
    assert not masks[:, 0].all()   # still sparse where no text is
    assert semantics.text_blocks(TokenGrid(2, 4, 4), 32, 32, 16, 16) is None
