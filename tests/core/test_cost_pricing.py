"""Pricing the accuracy options by what they run: the pooled remainder (an attention over KB pooled
keys, its merge, its ATen ops), the corrections' epilogues (their extra tiles, traffic and ops),
version-1 cost models loading with defaulted prices, and the search not preferring a pooled,
corrected candidate whose extra ops do not pay."""
import json

import pytest
import torch

from vsopt.core import semantics
from vsopt.core.costmodel import CostModel, SiteWork
from vsopt.core.ir import TokenGrid
from vsopt.core.patterns import num_blocks
from vsopt.core.plan import HeadPlan, SitePlan, Sparsity
from vsopt.core.pooled import Remainder
from vsopt.core.rettention import Correction, Phase, Renorm

KEY = "none/d64/64x64"
MODEL = CostModel(gpu="synthetic", launch_us={KEY: 6.0}, per_block_us={KEY: 0.02}, per_query_block_us={KEY: 0.05},
                  permute_fixed_us=9.0, permute_us_per_mib=2.0,
                  sdpa_us={"d64": {"launch": 4.0, "qblock": 0.01, "block": 0.03}},
                  overhead_us={"eager": 3.0, "eager_per_launch": 60.0, "cudagraphs": 0.0, "cudagraphs_per_launch": 3.0})
GRID = TokenGrid(4, 16, 16)   # 1024 tokens: 16 blocks of 64
HEADS, BATCH, D = 4, 2, 64


def _site():
    n = GRID.num_tokens
    return SitePlan("attn", HEADS, n, n, GRID, (HeadPlan(),) * HEADS)


def _shape():
    return semantics.SiteShape.of_plan(_site(), BATCH, D, torch.bfloat16)


def _masks(density=0.2, seed=0):
    qb = num_blocks(GRID.num_tokens, 64)
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(qb, qb, generator=g) < density for _ in range(HEADS)]


def _heads(remainder=Remainder.DROP, renorm=None):
    return tuple(HeadPlan(Sparsity.MASK, mask=m, remainder=remainder, renorm=renorm) for m in _masks())


def _total(heads, cost=MODEL, cudagraphs=True):
    shape = _shape()
    return semantics.predicted_us(shape, heads, cost) + semantics.lowering_overhead_us(shape, heads, cost, cudagraphs)


@pytest.mark.parametrize("cudagraphs", [True, False])
def test_a_pooled_head_costs_at_least_sdpa_over_its_pooled_keys_more(cudagraphs):
    plain, pooled = _total(_heads(), cudagraphs=cudagraphs), _total(_heads(Remainder.POOLED), cudagraphs=cudagraphs)
    kb = num_blocks(GRID.num_tokens, 64)
    sdpa_at_kb = MODEL.dense_us(1, BATCH * HEADS, GRID.num_tokens, kb, D)
    assert pooled - plain >= sdpa_at_kb > 0
    # exactly: the pooled attention (SDPA at KB plus its score passes), the merge, the ops at the per-launch price
    work = semantics.site_work(_shape(), _heads(Remainder.POOLED), [float(m.float().mean()) for m in _masks()])
    ops = semantics.extra_ops(_heads(Remainder.POOLED))
    assert work.pooled == ((BATCH * HEADS, GRID.num_tokens, kb, D),) and ops > 10
    assert pooled - plain == pytest.approx(MODEL.pooled_attention_us(*work.pooled[0]) + work.extra_mib * 2.0
                                           + ops * MODEL.overhead_us[("cudagraphs" if cudagraphs else "eager") + "_per_launch"])
    # a fitted pooled_us replaces the default, and the defaulted prices say what was defaulted
    fitted = CostModel(**{**MODEL.__dict__, "pooled_us": {"d64": {"launch": 50.0}}, "op_us": {"cudagraphs": 1.0}})
    assert fitted.pooled_attention_us(*work.pooled[0]) == 50.0
    assert len(MODEL.defaulted_prices(True)) == 2 and fitted.defaulted_prices(True) == []
    assert [p.split(":")[0] for p in fitted.defaulted_prices(False)] == ["extra ATen op"]


@pytest.mark.parametrize("kind", list(Correction))
def test_a_corrected_plan_costs_its_measuring_tiles_traffic_and_ops_more(kind):
    every = 3
    shape, masks = _shape(), _masks()
    plain, auto = _heads(), _heads(renorm=Renorm(every, Phase.AUTO, kind))
    qb = kb = num_blocks(GRID.num_tokens, 64)
    dropped = sum(BATCH * qb * kb * (1 - float(m.float().mean())) / every for m in masks)  # measuring: every block
    ops = semantics.extra_ops(auto)
    c = semantics._op_counts()
    assert c["mass_correct"] + 2 < ops < c["resid_measure_pooled"] + c["mass_measure"]
    want = dropped * 0.02 + semantics.renorm_mib(shape, auto) * 2.0 + ops * 3.0
    assert _total(auto) - _total(plain) == pytest.approx(want, abs=HEADS * 0.02)
    # a correcting step alone: no extra tiles, only the epilogue
    corr = _heads(renorm=Renorm(every, Phase.CORRECT, kind))
    assert _total(corr) - _total(plain) == pytest.approx(semantics.renorm_mib(shape, corr) * 2.0
                                                         + semantics.extra_ops(corr) * 3.0)


def test_a_version_1_cost_model_loads_with_defaulted_prices(tmp_path):
    d = MODEL.to_dict()
    assert d["version"] == 2 and d["pooled_us"] == {} and d["op_us"] == {}
    v1 = {k: v for k, v in d.items() if k not in ("pooled_us", "op_us")}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps({**v1, "version": 1}))
    back = CostModel.load(path)
    assert back == MODEL and back.op_cost_us(True) == 3.0 and back.op_cost_us(False) == 60.0
    bare = CostModel(gpu="g", launch_us={KEY: 6.0}, per_block_us={KEY: 0.02}, per_query_block_us={KEY: 0.05})
    assert bare.op_cost_us(True) == 0.0 and "0 (not measured)" in bare.defaulted_prices(True)[1]
    # no SDPA coefficients: the pooled attention is vsopt's kernel over the KB pooled keys
    assert bare.pooled_attention_us(8, 1024, 16, 64) == pytest.approx(
        bare.predict_us(SiteWork((semantics.Launch("none", 64, 64, 64, 8 * 16, 8 * 16 * 1),))))
    with pytest.raises(Exception, match="op_us keys"):
        CostModel.from_dict({**d, "op_us": {"graphs": 1.0}})


def test_the_search_does_not_take_a_pooled_corrected_candidate_whose_ops_do_not_pay():
    """A synthetic site: each mask candidate also offered pooled and mass-corrected (every 3), at a
    third of the error. Where its extra ops cost nothing it wins the error budget with the sparsest
    mask; priced (SDPA at KB, its ops at the per-launch overhead), plain, denser masks that meet
    the budget are faster, and the search takes them."""
    from vsopt.calibration import search_site_error
    from vsopt.calibration.choices import site_time_us
    from vsopt.calibration.measure import SiteState, build_candidates
    from vsopt.calibration.options import CalibrationOptions
    from vsopt.core.plan import Quant
    from vsopt.core.orders import TokenOrder
    from tests.core.test_calibrate_search import make_site

    site = make_site(GRID, HEADS, d=D)
    opt = CalibrationOptions(block_m=64, block_n=64, mass_shares=(0.5, 0.9), patterns=False, dynamic=False,
                             pooled_remainder=True, quants=(Quant.NONE,))
    state = SiteState(site, opt, (TokenOrder.FHW,))
    state.head_orders = [TokenOrder.FHW] * HEADS
    qb = num_blocks(GRID.num_tokens, 64)
    sparse = {"mask@0.5": (0.1, 0.06), "mask@0.9": (0.4, 0.01)}   # density, plain squared error
    _candidates(state, qb, sparse)
    labels = [c.label for c in state.candidates]
    err, dens = torch.zeros(HEADS, len(labels), dtype=torch.float64), torch.zeros(HEADS, len(labels), dtype=torch.float64)
    for j, lab in enumerate(labels):
        base = lab.split("+")[0].split("/")[0]
        d, e = (1.0, 0.0) if base == "dense" else sparse[base]
        err[:, j], dens[:, j] = (e / 3 if "+pooled" in lab else e), d
    state.err2, state.density, state.error_calls = err, dens, 1
    state.norm2 = torch.ones(HEADS, dtype=torch.float64)
    state.quant_err2 = torch.zeros(HEADS, 1, dtype=torch.float64)
    budget = 0.03 ** 0.5   # site error sqrt(mean err2): mask@0.5 alone (0.06) misses it, corrected (0.02) meets it
    free = CostModel(**{**MODEL.__dict__, "op_us": {"cudagraphs": 0.0, "eager": 0.0}, "sdpa_us": {},
                        "permute_us_per_mib": 0.0, "pooled_us": {"d64": {"launch": 0.0}}})
    pick = lambda cost: [state.candidates[c.candidate].label for c in search_site_error(state, cost, budget)]  # noqa
    assert set(pick(free)) == {"mask@0.5+pooled/renorm3"}
    priced = pick(MODEL)
    assert priced and not any("+pooled" in lab for lab in priced)   # plain masks meet the budget, faster
    choose = lambda lab: [_choice(state, lab)] * HEADS  # noqa: E731
    assert site_time_us(state, choose("mask@0.9"), MODEL) < site_time_us(state, choose("mask@0.5+pooled/renorm3"), MODEL)


def _candidates(state, qb, sparse):
    """dense, the masks of `sparse` (random at their densities), each again pooled and renormalized."""
    import dataclasses

    from vsopt.calibration.measure import Candidate

    g = torch.Generator().manual_seed(3)
    cands = [Candidate("dense", Sparsity.DENSE)]
    for lab, (d, _) in sparse.items():
        masks = torch.rand(HEADS, qb, qb, generator=g) < d
        masks |= torch.eye(qb, dtype=torch.bool)
        cands.append(Candidate(lab, Sparsity.MASK, masks))
    cands += [dataclasses.replace(c, label=c.label + "+pooled/renorm3", remainder=Remainder.POOLED,
                                  renorm=Renorm(3)) for c in cands[1:]]
    state.candidates, state.plans = cands, {}


def _choice(state, label):
    from vsopt.calibration import HeadChoice
    from vsopt.core.plan import Quant

    c = [x.label for x in state.candidates].index(label)
    return HeadChoice(c, Quant.NONE, float(state.err2[0, c]), 0.0, float(state.density[0, c]))
