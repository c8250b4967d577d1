"""Softmax-mass correction (Re-ttention, vsopt.core.rettention): the measuring step's statistics and
the corrected output against their definition written directly in float64; exact where the
statistics are current; the plan entry (schema, phases per step, step variants)."""
import pytest
import torch
import torch.nn.functional as F

from vsopt.core import semantics
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.errors import ConfigError, PlanError
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity, StepPlan
from vsopt.core.pooled import Remainder, reference_pooled_attention
from vsopt.core.rettention import Phase, Renorm, measured_step, reference_renorm, renorm_phase
from vsopt.core.steps import step_variants, variant_steps


def _masks(b, h, qb, kb, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, qb, kb, generator=g) < 0.4
    m[..., 0, :] = False  # a row keeping nothing: all its mass is the residual's
    m[..., -1, :] = True  # a row keeping everything: rho 1, no residual
    return m


def _qkv(B, H, Hkv, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, N, D, generator=g) for h in (H, Hkv, Hkv))


def _drift(qkv, eps, seed):
    """The inputs of a later step: close to the measuring step's (statistics change slowly)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(x + eps * torch.randn(x.shape, generator=g) for x in qkv)


@pytest.mark.parametrize("B, H, Hkv, N, D, bm, bn", [
    (1, 2, 2, 40, 16, 16, 16),    # ragged last blocks
    (2, 4, 2, 37, 8, 16, 32),     # GQA, odd length, unequal blocks
    (1, 3, 3, 96, 16, 32, 16),
])
def test_corrected_output_matches_its_float64_definition(B, H, Hkv, N, D, bm, bn):
    measured = _qkv(B, H, Hkv, N, D, seed=N)
    current = _drift(measured, 0.3, seed=N + 1)
    masks = _masks(1 if B == 1 else B, H, -(-N // bm), -(-N // bn), seed=H)
    scale = D ** -0.5
    ex = lambda t: (t[0], semantics.kv_to_heads(t[1], H), semantics.kv_to_heads(t[2], H))  # noqa: E731
    _, rho, resid = semantics.renorm_statistics(*ex(measured), masks, scale, Quant.NONE, bm, bn)
    got = semantics.renorm_corrected(*ex(current), masks, scale, Quant.NONE, bm, bn, rho, resid)
    want = reference_renorm(measured, current, masks, scale, bm, bn)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # must NOT match: the plain sparse output (no correction)
    plain = semantics.masked_attention(*ex(current), masks, scale, Quant.NONE, bm, bn)
    assert (plain.double() - want).abs().max() > 1e-2


@pytest.mark.parametrize("N, bm", [(48, 16), (45, 16)])
def test_statistics_of_the_same_step_give_exact_attention_or_psa(N, bm):
    q, k, v = _qkv(1, 3, 3, N, 8, seed=N)
    masks = _masks(1, 3, -(-N // bm), -(-N // bm), seed=1)
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.4)
    out, rho, resid = semantics.renorm_statistics(q, k, v, masks, 0.4, Quant.NONE, bm, bm)
    torch.testing.assert_close(out.double(), dense, rtol=1e-4, atol=1e-5)          # the measuring output
    corrected = semantics.renorm_corrected(q, k, v, masks, 0.4, Quant.NONE, bm, bm, rho, resid)
    torch.testing.assert_close(corrected.double(), dense, rtol=1e-4, atol=1e-5)    # current statistics: exact
    assert float(rho[..., -bm // 2:].min()) > 1 - 1e-6 and float(rho[..., :bm].max()) < 1e-6
    # measured with the pooled remainder: the same step's correction is PSA's output
    psa = reference_pooled_attention(q, k, v, masks, 0.4, bm, bm)
    out, rho, resid = semantics.renorm_statistics(q, k, v, masks, 0.4, Quant.NONE, bm, bm, Remainder.POOLED)
    torch.testing.assert_close(out.double(), psa, rtol=1e-4, atol=1e-5)
    corrected = semantics.renorm_corrected(q, k, v, masks, 0.4, Quant.NONE, bm, bm, rho, resid)
    torch.testing.assert_close(corrected.double(), psa, rtol=1e-4, atol=1e-5)


def test_quantized_heads_merge_with_the_smoothing_shift():
    q, k, v = _qkv(1, 2, 2, 64, 16, seed=3)
    k = k + 2.0  # a large key mean: without the shift added back the merge weights are off
    masks = _masks(1, 2, 4, 4, seed=2)
    out, _, _ = semantics.renorm_statistics(q, k, v, masks, 0.25, Quant.INT8, 16, 16)
    dense = F.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert float((out - dense).abs().max()) < 0.05


def _site(H=2, grid=TokenGrid(2, 4, 6), bm=16):
    return SitePlan("attn", H, grid.num_tokens, grid.num_tokens, grid,
                    (HeadPlan(block_m=bm, block_n=bm),) * H)


def _heads(site, phase, remainder=Remainder.DROP, order=TokenOrder.FHW, dynamic=False):
    out = []
    for h in range(site.num_heads):
        if dynamic and h == 0:
            kw = dict(sparsity=Sparsity.DYNAMIC, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.3))
        else:
            kw = dict(sparsity=Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1))
        out.append(HeadPlan(order=order, block_m=16, block_n=16, remainder=remainder,
                            renorm=Renorm(every=3, phase=phase), **kw))
    return tuple(out)


@pytest.mark.parametrize("order, dynamic", [(TokenOrder.FHW, False), (TokenOrder.HWF, True)])
def test_site_output_measures_exactly_and_corrects_with_the_measuring_steps_inputs(order, dynamic):
    site = _site()
    scale = 0.35
    measured = _qkv(1, 2, 2, 48, 8, seed=5)
    current = _drift(measured, 0.2, seed=6)
    dense = F.scaled_dot_product_attention(*current, scale=scale)
    out = semantics.site_output(site, _heads(site, Phase.MEASURE, order=order, dynamic=dynamic), *current, scale)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)
    heads = _heads(site, Phase.CORRECT, order=order, dynamic=dynamic)
    with pytest.raises(ConfigError, match="renorm_from"):
        semantics.site_output(site, heads, *current, scale)
    got = semantics.site_output(site, heads, *current, scale, renorm_from=measured)
    # the reference in the heads' order, under the masks of the measuring step's q/k
    perm, *mp = semantics.permuted_qkv(site.grid, heads, *measured)
    _, *cp = semantics.permuted_qkv(site.grid, heads, *current)
    masks = semantics.head_masks(site, heads, *measured[:2], scale)
    want = reference_renorm(tuple(mp), tuple(cp), masks, scale, 16, 16).float()
    want = want if perm is None else torch.ops.vsopt.unpermute_tokens(want, perm)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    plain = semantics.site_output(site, tuple(HeadPlan(**{**h.__dict__, "renorm": None}) for h in heads), *current,
                                  scale, masks_from=measured[:2])
    assert float((got - dense).norm()) < float((plain - dense).norm())   # the correction helps here


def test_head_densities_count_the_measuring_steps_blocks():
    site = _site()
    kept = semantics.head_densities(site, _heads(site, Phase.CORRECT))
    assert semantics.head_densities(site, _heads(site, Phase.MEASURE)) == [1.0, 1.0]
    auto = semantics.head_densities(site, _heads(site, Phase.AUTO))
    assert auto == pytest.approx([d + (1 - d) / 3 for d in kept])
    assert semantics.head_densities(site, _heads(site, Phase.MEASURE, Remainder.POOLED)) == pytest.approx(kept)


def test_renorm_phases_by_step():
    spec = Renorm(every=3)
    assert [renorm_phase(spec, s, 2).value for s in range(2, 8)] == ["measure", "correct", "correct"] * 2
    assert renorm_phase(spec, None, None) is Phase.MEASURE
    assert [measured_step(spec, s, 2) for s in range(2, 8)] == [2, 2, 2, 5, 5, 5]
    with pytest.raises(ValueError, match="before"):
        renorm_phase(spec, 1, 2)


def test_plan_schema_round_trip_and_refusals(tmp_path):
    site = _site()
    heads = _heads(site, Phase.AUTO)
    plan = Plan({"attn": SitePlan("attn", 2, 48, 48, site.grid, heads)})
    path = plan.save(tmp_path / "p.plan.json")
    back = Plan.load(path)
    assert back["attn"].heads == heads and back["attn"].heads[0].renorm == Renorm(3)
    for bad, match in [(dict(), "dense"), (dict(sparsity=Sparsity.SKIP), "skip")]:
        with pytest.raises(ValueError, match=match):
            HeadPlan(renorm=Renorm(2), **bad)
    with pytest.raises(ValueError, match="reuse_steps 0"):
        HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(reuse_steps=1), renorm=Renorm(2))
    for every in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="every"):
            Renorm(every)
    doc, _ = plan.to_json()
    doc["sites"]["attn"]["heads"][0]["renorm"] = {"every": 3, "period": 2}
    with pytest.raises(PlanError, match="unknown field"):
        Plan.from_json(doc, {})


def test_at_step_resolves_phases_and_step_variants_build_one_graph_per_phase_pattern():
    site = _site()
    heads = _heads(site, Phase.AUTO)
    plain = tuple(HeadPlan(sparsity=Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16)
                  for _ in range(2))
    sp = SitePlan("attn", 2, 48, 48, site.grid, heads, steps=(StepPlan(0, 1, plain), StepPlan(1, None, heads)))
    plan = Plan({"attn": sp})
    assert [h.renorm.phase for h in plan.at_step(1)["attn"].heads] == [Phase.MEASURE] * 2
    assert [h.renorm.phase for h in plan.at_step(3)["attn"].heads] == [Phase.CORRECT] * 2
    assert plan.at_step(4)["attn"].heads[0].renorm.phase is Phase.MEASURE  # 1 + 3
    assert plan.at_step(0)["attn"].heads == plain
    built = []
    run = step_variants(plan, lambda p: built.append(p) or (lambda: p))
    keys = variant_steps(plan)
    # unknown step (measure), step 0 (plain), segment from 1: measure, correct; the unknown step runs
    # the same heads as the segment's measuring steps, so they share one build (vsopt.core.steps)
    assert len(keys) == 4 and len(built) == 3
    from vsopt.core.dynamic import set_denoising_step
    try:
        for step, phase in [(1, Phase.MEASURE), (2, Phase.CORRECT), (3, Phase.CORRECT), (7, Phase.MEASURE)]:
            set_denoising_step(step)
            assert run()["attn"].heads[1].renorm.phase is phase
    finally:
        set_denoising_step(None)
