"""Pooled remainder (PSA, vsopt.core.pooled): the kept blocks at full resolution plus one pooled
key per dropped block in the same softmax, against the pooled softmax written directly in float64;
through semantics.site_output and through the lowered graph (lower_plan), odd sizes included."""
import json

import pytest
import torch
import torch.nn.functional as F

from vsopt.backend import trace_and_rewrite
from vsopt.core import semantics
from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.errors import PlanError
from vsopt.core.ir import TokenGrid
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity
from vsopt.core.pooled import Remainder, reference_pooled_attention


def _random_masks(b, h, qb, kb, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, qb, kb, generator=g) < 0.35
    m[..., 0, :] = False  # a row keeping nothing: everything pooled
    m[..., -1, :] = True  # a row keeping everything: nothing pooled
    return m


@pytest.mark.parametrize("B, H, Hkv, Nq, Nk, D, bm, bn", [
    (1, 2, 2, 40, 40, 16, 16, 16),     # ragged last blocks
    (2, 4, 2, 37, 53, 8, 16, 32),      # GQA, odd sizes, cross lengths
    (1, 3, 3, 96, 64, 16, 32, 16),     # equal blocks: only rows mixing kept and pooled feel the bias
])
def test_pooled_attention_matches_the_direct_pooled_softmax(B, H, Hkv, Nq, Nk, D, bm, bn):
    g = torch.Generator().manual_seed(Nq + Nk)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    masks = _random_masks(1 if B == 1 else B, H, -(-Nq // bm), -(-Nk // bn), seed=B + H)
    scale = D ** -0.5
    got = semantics.pooled_masked_attention(q, k, v, masks, scale, Quant.NONE, bm, bn)
    want = reference_pooled_attention(q, k, v, masks, scale, bm, bn)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # must NOT match: dropping the remainder, or pooling without the log-size bias
    dropped = semantics.masked_attention(q, semantics.kv_to_heads(k, H), semantics.kv_to_heads(v, H), masks, scale,
                                         Quant.NONE, bm, bn)
    assert (dropped.double() - want).abs().max() > 1e-2
    unbiased = reference_pooled_attention(q, k, v, masks, scale, bm, bn, size_bias=False)
    assert (got.double() - unbiased).abs().max() > 1e-2


def test_every_block_kept_is_plain_attention_and_none_kept_is_attention_over_pooled_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 48, 8, generator=g) for _ in range(3))
    full = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    torch.testing.assert_close(semantics.pooled_masked_attention(q, k, v, full, 0.3, Quant.NONE, 16, 16),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3), rtol=1e-5, atol=1e-6)
    none = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    kbar, vbar = k.unflatten(2, (3, 16)).mean(3), v.unflatten(2, (3, 16)).mean(3)  # equal blocks: bias cancels
    torch.testing.assert_close(semantics.pooled_masked_attention(q, k, v, none, 0.3, Quant.NONE, 16, 16),
                               F.scaled_dot_product_attention(q, kbar, vbar, scale=0.3), rtol=1e-5, atol=1e-6)


def test_quantized_pooled_heads_stay_close_to_the_float_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    k = k + 2.0  # a key offset, which INT8 K smoothing removes and the merge must add back
    masks = _random_masks(1, 2, 4, 4, seed=3)
    want = reference_pooled_attention(q, k, v, masks, 0.25, 16, 16)
    got = semantics.pooled_masked_attention(q, k, v, masks, 0.25, Quant.INT8, 16, 16)
    assert (got.double() - want).norm() / want.norm() < 0.02


GRID = TokenGrid(3, 3, 5)  # 45 tokens: ragged blocks


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("head", [
    HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16, remainder="pooled"),
    HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.3), block_m=16, block_n=16,
             remainder="pooled", order="hwf"),
])
def test_lowered_graph_computes_the_pooled_meaning(head):
    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(2, GRID.num_tokens, 32)
    _, report = trace_and_rewrite(model, (x,), VsoptConfig(grid=GRID))
    (site,) = report.sites
    plain = HeadPlan(head.sparsity, pattern=head.pattern, dynamic=head.dynamic, block_m=16, block_n=16,
                     order=head.order)
    heads = (head, plain)  # one pooled head, one dropping: two launches
    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    gm, rep = trace_and_rewrite(model, (x,), VsoptConfig(plan=plan, grid=GRID))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.vsopt.block_sparse_attention_lse.default in targets
    assert torch.ops.aten.logsumexp.default in targets
    q, k, v = model.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
    with torch.no_grad():
        meaning = semantics.site_output(site, heads, q, k, v, 16 ** -0.5)
        got = gm(x)
    torch.testing.assert_close(got, meaning.transpose(1, 2).flatten(2), rtol=1e-5, atol=1e-5)
    # the pooled head differs from the dropping one's meaning; the dropping head is unchanged
    dropped = semantics.site_output(site, (plain, plain), q, k, v, 16 ** -0.5)
    assert (meaning[:, 0] - dropped[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(meaning[:, 1], dropped[:, 1])


def test_remainder_in_the_schema(tmp_path):
    head = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16, remainder="pooled")
    assert head.remainder is Remainder.POOLED and head.to_json(None)["remainder"] == "pooled"
    assert "remainder" not in HeadPlan().to_json(None)  # older readers see the plans they know
    with pytest.raises(ValueError, match="cannot have remainder 'pooled'"):
        HeadPlan(remainder="pooled")
    with pytest.raises(ValueError, match="HeadPlan.remainder: 'half' is not one of"):
        HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), remainder="half")
    doc = {"format": "vsopt-plan", "version": 1, "sites": {"s": {"num_heads": 1, "q_len": 45, "kv_len": 45,
           "grid": GRID.to_dict(), "heads": [dict(head.to_json(None), remainder="half")]}}}
    with pytest.raises(PlanError, match="remainder") as e:
        Plan.from_json(doc, {})
    assert "\n" not in str(e.value)
    doc["sites"]["s"]["heads"] = [head.to_json(None)]
    assert Plan.from_json(json.loads(json.dumps(doc)), {})["s"].heads[0] == head


def test_calibration_offers_pooled_candidates_measured_as_they_run():
    from vsopt.calibration import CalibrationOptions
    from vsopt.calibration.capture import SiteCall
    from vsopt.calibration.choices import head_options, head_plan
    from vsopt.calibration.measure import SiteState, build_candidates, exact_attention, measure_errors, measure_mass
    from vsopt.core.orders import TokenOrder

    from tests.core.test_calibrate_search import COST, local_qk, make_site

    grid = TokenGrid(2, 4, 8)
    q, k = local_qk(grid, [TokenOrder.FHW, TokenOrder.HWF], width=6.0, seed=4)
    v = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    site = make_site(grid, 2)
    call = SiteCall(site.site_id, q, k, v, None, 1.0, False, None)
    opt = CalibrationOptions(block_m=16, block_n=16, mass_shares=(0.5, 0.9), patterns=False, dynamic_values=(),
                             dynamic_top_k=(0.25,), pooled_remainder=True, quants=(Quant.NONE,))
    state = SiteState(site, opt, tuple(TokenOrder))
    measure_mass(state, call)
    build_candidates(state)
    measure_errors(state, call)
    labels = [c.label for c in state.candidates]
    ref = exact_attention(call)
    for base in ("mask@0.5", "topk@0.25"):
        c0, c1 = labels.index(base), labels.index(base + "+pooled")
        heads = [head_plan(state, h, c1, Quant.NONE) for h in range(2)]
        assert all(hp.remainder is Remainder.POOLED for hp in heads)
        out = semantics.site_output(site, heads, q, k, v, 1.0)
        want = (out.double() - ref.double()).pow(2).sum((0, 2, 3))
        torch.testing.assert_close(state.err2[:, c1], want, rtol=1e-6, atol=1e-9)
        assert (state.err2[:, c1] < state.err2[:, c0]).all()  # the pooled remainder recovers lost mass
        torch.testing.assert_close(state.density[:, c1], state.density[:, c0])  # the same kept blocks
        opts = {o.candidate: o for o in head_options(state, COST, (Quant.NONE,))[0]}
        assert opts[c1].time_us > opts[c0].time_us  # and costs more
