"""The plan: schema, JSON + safetensors files, validation against a model's sites."""
import json
import os

import pytest
import torch

from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import DynamicMethod, DynamicSpec
from vsopt.core.errors import PlanError
from vsopt.core.ir import AttentionSite, Layout, TokenGrid
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import LocalWindow, Radial, TemporalDiagonals, Union, VerticalStripes, block_mask
from vsopt.core.plan import SCHEMA_VERSION, HeadPlan, Plan, Quant, SitePlan, Sparsity, StepPlan

GRID = TokenGrid(3, 4, 5, text_before=2)


def site(sid="blocks.0.attn1", heads=3, grid=GRID, n=None):
    n = n if n is not None else grid.num_tokens
    return AttentionSite(sid, 0, "sdpa", Layout.BHND, 1, heads, heads, 8, 8, n, n, torch.float32, 0.35, grid=grid)


def rich_plan():
    s0, s1 = site(), site("blocks.1.attn1", heads=2, grid=None, n=50)
    mask = torch.rand(4, 4) > 0.5
    heads0 = [HeadPlan(Sparsity.MASK, TokenOrder.HWF, Quant.INT8, 16, 16, mask=mask),
              HeadPlan(Sparsity.PATTERN, TokenOrder.WFH, Quant.FP8, 32, 16,
                       pattern=Union((LocalWindow(1, 1, 1), VerticalStripes((0, -1))))),
              HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(DynamicMethod.CUMULATIVE_MASS, 0.9, reuse_steps=3))]
    early = [HeadPlan(), HeadPlan(Sparsity.SKIP), HeadPlan(Sparsity.PATTERN, pattern=Radial(2, 1), block_m=16,
                                                           block_n=16)]
    plan = Plan({s0.site_id: SitePlan.for_site(s0, heads0, steps=[StepPlan(0, 5, early)]),
                 s1.site_id: SitePlan.for_site(s1, HeadPlan(quant=Quant.INT8_FP8))}, meta={"model": "tiny"})
    return plan, [s0, s1], mask


def test_round_trip(tmp_path):
    plan, sites, mask = rich_plan()
    path = plan.save(tmp_path / "m.plan.json")
    assert sorted(os.listdir(tmp_path)) == ["m.plan.json", "m.plan.safetensors"]  # no temp files left
    loaded = Plan.load(path)
    assert loaded == plan
    assert torch.equal(loaded["blocks.0.attn1"].heads[0].mask, mask)
    assert loaded.meta == {"model": "tiny"}
    doc = json.loads(path.read_text())
    assert doc["version"] == SCHEMA_VERSION and doc["sites"]["blocks.0.attn1"]["heads"][0]["order"] == "hwf"
    loaded.validate_against(sites)
    # overwriting works and a plan without masks writes no arrays file
    Plan.dense(sites).save(tmp_path / "d.plan.json")
    assert not (tmp_path / "d.plan.safetensors").exists()
    assert Plan.load(tmp_path / "d.plan.json").sites["blocks.1.attn1"].is_dense


def test_enums_at_the_api_strings_converted():
    h = HeadPlan("pattern", "hwf", "int8", pattern=TemporalDiagonals())
    assert h.sparsity is Sparsity.PATTERN and h.order is TokenOrder.HWF and h.quant is Quant.INT8
    with pytest.raises(ValueError, match="quant: 'int4' is not one of"):
        HeadPlan(quant="int4")


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=Sparsity.PATTERN), "needs `pattern`"),
    (dict(sparsity=Sparsity.DENSE, pattern=LocalWindow()), "must not set `pattern`"),
    (dict(sparsity=Sparsity.MASK), "needs `mask`"),
    (dict(sparsity=Sparsity.DYNAMIC), "needs `dynamic`"),
    (dict(block_m=48), "power of two"),
    (dict(block_n=512), "power of two in \\[16, 256\\]"),
])
def test_head_plan_rejects_inconsistent_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HeadPlan(**kwargs)


def test_site_plan_checks():
    s = site()
    with pytest.raises(ValueError, match="has 1 head plans, expected 3"):
        SitePlan(s.site_id, 3, s.q_len, s.kv_len, GRID, (HeadPlan(),))
    with pytest.raises(ValueError, match="overlap"):
        SitePlan.for_site(s, HeadPlan(), steps=[StepPlan(0, 4, [HeadPlan()] * 3), StepPlan(3, None, [HeadPlan()] * 3)])
    with pytest.raises(ValueError, match="mask has shape"):
        SitePlan.for_site(s, HeadPlan(Sparsity.MASK, mask=torch.ones(3, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="pattern heads and token orders need self-attention"):
        SitePlan.for_site(site(grid=None, n=62), HeadPlan(Sparsity.PATTERN, pattern=LocalWindow()))
    sp = SitePlan.for_site(s, HeadPlan(), steps=[StepPlan(2, 4, [HeadPlan(Sparsity.SKIP)] * 3)])
    assert sp.heads_at(None) == sp.heads_at(1) == sp.heads_at(4) == (HeadPlan(),) * 3
    assert sp.heads_at(2)[0].sparsity is Sparsity.SKIP
    assert sp.density(3) == 0.0 and sp.density() == 1.0


def test_dense_uniform_and_density():
    s0, s1 = site(), site("x", heads=2, grid=None, n=10)
    dense = Plan.dense([s0, s1])
    assert all(sp.is_dense for sp in dense.sites.values()) and dense.density() == 1.0
    head = HeadPlan(Sparsity.PATTERN, TokenOrder.HWF, Quant.INT8, 16, 16, pattern=LocalWindow(0, 1, 1))
    uni = Plan.uniform([s0, s1], head)
    assert uni["blocks.0.attn1"].heads == (head,) * 3
    assert uni["x"].heads[0] == HeadPlan(quant=Quant.INT8, block_m=16, block_n=16)  # no grid: dense
    assert uni.meta["uniform_dense_sites"] == ["x"]
    expected = float(block_mask(LocalWindow(0, 1, 1), GRID, "hwf", 16, 16).float().mean())
    assert uni["blocks.0.attn1"].density() == pytest.approx(expected)
    assert uni.density() == pytest.approx((3 * expected + 2 * 1.0) / 5)


def test_validate_against_another_model_says_what_differs():
    plan, sites, _ = rich_plan()
    other = [site(heads=4), site("blocks.1.attn1", heads=2, grid=None, n=64)]
    with pytest.raises(PlanError) as e:
        plan.validate_against(other)
    msg = str(e.value)
    assert "site 'blocks.0.attn1': plan has heads 3, model has 4" in msg
    assert "site 'blocks.1.attn1': plan has q_len (N) 50, model has 64" in msg
    with pytest.raises(PlanError, match=r"plan sites not in the model: \['blocks.1.attn1'\]"):
        plan.validate_against(sites[:1])
    regrid = TokenGrid(3, 5, 4, text_before=2)  # same N, different geometry
    with pytest.raises(PlanError, match="plan has grid 2\\+3x4x5, model has grid 2\\+3x5x4"):
        plan.validate_against([site(grid=regrid), sites[1]])
    plan.validate_against(sites + [site("blocks.9.attn1")])  # model sites without a plan stay dense


def test_load_rejects_newer_version_and_corrupt_files(tmp_path):
    plan, _, _ = rich_plan()
    path = plan.save(tmp_path / "m.plan.json")
    doc = json.loads(path.read_text())

    def write(d, name="bad.plan.json"):
        p = tmp_path / name
        p.write_text(json.dumps(d) if not isinstance(d, str) else d)
        return p

    with pytest.raises(PlanError, match=f"schema version {SCHEMA_VERSION + 1}, newer than"):
        Plan.load(write({**doc, "version": SCHEMA_VERSION + 1}))
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(write(path.read_text()[: len(path.read_text()) // 2]))
    with pytest.raises(PlanError, match="is not a vsopt plan"):
        Plan.load(write({"sites": {}}))
    with pytest.raises(PlanError, match="invalid schema version"):
        Plan.load(write({**doc, "version": "1"}))
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.plan.json")
    bad_head = json.loads(json.dumps(doc))
    bad_head["sites"]["blocks.0.attn1"]["heads"][1]["order"] = "fwx"
    with pytest.raises(PlanError, match="site 'blocks.0.attn1' head 1: 'fwx' is not a valid TokenOrder"):
        Plan.load(write(bad_head))
    bad_pattern = json.loads(json.dumps(doc))
    bad_pattern["sites"]["blocks.0.attn1"]["heads"][1]["pattern"] = {"kind": "spiral"}
    with pytest.raises(PlanError, match="unknown pattern kind 'spiral'"):
        Plan.load(write(bad_pattern))
    no_heads = json.loads(json.dumps(doc))
    del no_heads["sites"]["blocks.1.attn1"]["num_heads"]
    with pytest.raises(PlanError, match="site 'blocks.1.attn1': KeyError"):
        Plan.load(write(no_heads))
    # the arrays file: corrupted, or missing
    arrays = tmp_path / "m.plan.safetensors"
    blob = bytearray(arrays.read_bytes())
    blob[-1] ^= 0xFF
    arrays.write_bytes(bytes(blob))
    with pytest.raises(PlanError, match="sha256 differs"):
        Plan.load(path)
    arrays.unlink()
    with pytest.raises(PlanError, match="needs its arrays file"):
        Plan.load(path)


def test_config_loads_a_plan_path(tmp_path):
    plan, _, _ = rich_plan()
    path = plan.save(tmp_path / "m.plan.json")
    cfg = VsoptConfig.from_options({"plan": str(path)})
    assert cfg.plan == plan
