"""Residual sharing (DiTFastAttn; Renorm kind "residual", vsopt.core.residual): the corrected output
against its definition written directly in float64, exact at the measuring step, the residual of
a PSA head; densities, pricing and the plan entry."""
import pytest
import torch
import torch.nn.functional as F

from vsopt.core import semantics
from vsopt.core.errors import ConfigError, PlanError
from vsopt.core.ir import TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity
from vsopt.core.pooled import Remainder
from vsopt.core.residual import reference_residual
from vsopt.core.rettention import Correction, Phase, Renorm, reference_renorm

from tests.core.test_calibrate_search import COST
from tests.core.test_rettention import _drift, _masks, _qkv

RESIDUAL = Correction.RESIDUAL


@pytest.mark.parametrize("B, H, Hkv, N, D, bm, bn", [
    (1, 2, 2, 40, 16, 16, 16),    # ragged last blocks
    (2, 4, 2, 37, 8, 16, 32),     # GQA, odd length, unequal blocks
])
@pytest.mark.parametrize("remainder", list(Remainder))
def test_corrected_output_matches_its_float64_definition(B, H, Hkv, N, D, bm, bn, remainder):
    measured = _qkv(B, H, Hkv, N, D, seed=N)
    current = _drift(measured, 0.3, seed=N + 1)
    masks = _masks(1 if B == 1 else B, H, -(-N // bm), -(-N // bn), seed=H)
    scale = D ** -0.5
    ex = lambda t: (t[0], semantics.kv_to_heads(t[1], H), semantics.kv_to_heads(t[2], H))  # noqa: E731
    out, rho, resid = semantics.renorm_statistics(*ex(measured), masks, scale, Quant.NONE, bm, bn, remainder, RESIDUAL)
    assert rho is None
    exact = F.scaled_dot_product_attention(*(x.double() for x in ex(measured)), scale=scale)
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-5)    # the measuring step is exact
    got = semantics.renorm_corrected(*ex(current), masks, scale, Quant.NONE, bm, bn, rho, resid, RESIDUAL, remainder)
    want = reference_residual(measured, current, masks, scale, bm, bn, pooled=remainder is Remainder.POOLED)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # must NOT match: the plain sparse output, nor the mass correction of the same statistics step
    plain = semantics.masked_attention(*ex(current), masks, scale, Quant.NONE, bm, bn)
    assert (plain.double() - want).abs().max() > 1e-2
    if remainder is Remainder.DROP:
        mass = reference_renorm(measured, current, masks, scale, bm, bn)
        assert (mass - want).abs().max() > 1e-3


@pytest.mark.parametrize("remainder", list(Remainder))
def test_residual_of_the_same_step_gives_exact_attention(remainder):
    q, k, v = _qkv(1, 3, 3, 48, 8, seed=4)
    masks = _masks(1, 3, 3, 3, seed=1)
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.4)
    _, _, resid = semantics.renorm_statistics(q, k, v, masks, 0.4, Quant.NONE, 16, 16, remainder, RESIDUAL)
    got = semantics.renorm_corrected(q, k, v, masks, 0.4, Quant.NONE, 16, 16, None, resid, RESIDUAL, remainder)
    torch.testing.assert_close(got.double(), dense, rtol=1e-4, atol=1e-5)


def _site(H=2, grid=TokenGrid(2, 4, 6)):
    return SitePlan("attn", H, grid.num_tokens, grid.num_tokens, grid, (HeadPlan(block_m=16, block_n=16),) * H)


def _heads(phase, remainder=Remainder.DROP, kind=RESIDUAL, order=TokenOrder.FHW):
    return tuple(HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), order=order, block_m=16, block_n=16,
                          remainder=remainder, renorm=Renorm(3, phase, kind)) for _ in range(2))


@pytest.mark.parametrize("remainder", list(Remainder))
def test_site_output_shares_the_measuring_steps_residual(remainder):
    site = _site()
    scale = 0.35
    measured = _qkv(1, 2, 2, 48, 8, seed=5)
    current = _drift(measured, 0.2, seed=6)
    dense = F.scaled_dot_product_attention(*current, scale=scale)
    out = semantics.site_output(site, _heads(Phase.MEASURE, remainder, order=TokenOrder.HWF), *current, scale)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)
    heads = _heads(Phase.CORRECT, remainder, order=TokenOrder.HWF)
    with pytest.raises(ConfigError, match="renorm_from"):
        semantics.site_output(site, heads, *current, scale)
    got = semantics.site_output(site, heads, *current, scale, renorm_from=measured)
    perm, *mp = semantics.permuted_qkv(site.grid, heads, *measured)
    _, *cp = semantics.permuted_qkv(site.grid, heads, *current)
    masks = semantics.head_masks(site, heads)
    want = reference_residual(tuple(mp), tuple(cp), masks, scale, 16, 16, remainder is Remainder.POOLED).float()
    torch.testing.assert_close(got, torch.ops.vsopt.unpermute_tokens(want, perm), rtol=1e-4, atol=1e-5)
    # a site mixing both corrections: each head what its own kind says
    mixed = (_heads(Phase.CORRECT, remainder)[0], _heads(Phase.CORRECT, remainder, Correction.MASS)[1])
    both = semantics.site_output(site, mixed, *current, scale, renorm_from=measured)
    alone = [semantics.site_output(site, (h,) * 2, *current, scale, renorm_from=measured)[:, i] for i, h in
             enumerate(mixed)]
    torch.testing.assert_close(both, torch.stack(alone, 1), rtol=1e-5, atol=1e-6)


def test_densities_and_pricing_count_the_exact_measuring_step_and_the_pooled_remainder_every_step():
    site = _site()
    kept = semantics.head_densities(site, _heads(Phase.CORRECT))
    for remainder in Remainder:   # measuring exactly, with or without a pooled remainder
        assert semantics.head_densities(site, _heads(Phase.MEASURE, remainder)) == [1.0, 1.0]
        auto = semantics.head_densities(site, _heads(Phase.AUTO, remainder))
        assert auto == pytest.approx([d + (1 - d) / 3 for d in kept])
    assert semantics.head_densities(site, _heads(Phase.CORRECT, Remainder.POOLED)) == pytest.approx(kept)
    shape = semantics.SiteShape.of_plan(site, 1, 16, torch.float32)
    # a correcting PSA head runs its pooled remainder (S is PSA's output); a mass-corrected one does not
    work = lambda kind: semantics.site_work(shape, _heads(Phase.CORRECT, Remainder.POOLED, kind), kept)  # noqa: E731
    assert len(work(RESIDUAL).pooled) == 1 and not work(Correction.MASS).pooled
    assert len(work(RESIDUAL).launches) == len(work(Correction.MASS).launches) == 1
    cost = COST
    measure = semantics.predicted_us(shape, _heads(Phase.MEASURE), cost)
    corr = semantics.predicted_us(shape, _heads(Phase.CORRECT), cost)
    plain = semantics.predicted_us(shape, tuple(HeadPlan(**{**h.__dict__, "renorm": None}) for h in _heads(Phase.CORRECT)),
                                   cost)
    assert measure > corr > plain   # every block when measuring; the sparse launch plus an add when correcting


def test_plan_schema_round_trip_and_refusals(tmp_path):
    site = _site()
    heads = _heads(Phase.AUTO, Remainder.POOLED)
    plan = Plan({"attn": SitePlan("attn", 2, 48, 48, site.grid, heads)})
    doc, _ = plan.to_json()
    assert doc["sites"]["attn"]["heads"][0]["renorm"] == {"every": 3, "kind": "residual"}
    back = Plan.load(plan.save(tmp_path / "p.plan.json"))
    assert back["attn"].heads == heads and back["attn"].heads[0].renorm.residual
    assert "kind" not in Renorm(3).to_dict()   # the mass correction writes what older plans hold
    with pytest.raises(ValueError, match="Renorm.kind 'window' is not one of"):
        Renorm(2, kind="window")
    doc["sites"]["attn"]["heads"][0]["renorm"] = {"every": 3, "kind": "resid"}
    with pytest.raises(PlanError, match="kind 'resid'"):
        Plan.from_json(doc, {})
    with pytest.raises(ValueError, match="dense"):
        HeadPlan(renorm=Renorm(2, kind=RESIDUAL))
