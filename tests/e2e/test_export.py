"""vsopt.export on real model code with a plan that mixes patterns, masks, skip and dense heads,
dynamic heads (top-k, cumulative mass), token orders and every quant mode: each format, loaded in
a fresh process (or, for the custom ONNX form, read back into the plan), matches the eager
optimized model. Models: the shipped reference model (a trained diffusers Wan) at a small clip,
a small diffusers Wan (self- and cross-attention) and CogVideoX (text before video)."""
from __future__ import annotations

import pytest
import torch

import vsopt
from vsopt.deploy import load

from . import model_factories
from ..conftest import max_rel_err
from ..plugins.mixed_plans import mixed_plan


def _reference():
    from vsopt.deploy.reference import _targets

    model, inputs, _ = _targets().reference(4, 16, 16)   # 4x8x8 latent tokens: small, 6 trained layers
    return model, tuple(inputs)


MODELS = {"reference": (_reference, 64), "wan": (model_factories.wan, 16), "cogvideox": (model_factories.cogvideox, 16)}


@pytest.fixture(scope="module")
def targets():
    cache = {}

    def get(name):
        if name not in cache:
            factory, block = MODELS[name]
            model, inputs = factory()
            cache[name] = (model, inputs, mixed_plan(model, inputs, block))
        return cache[name]

    return get


def _export(targets, name, fmt, tmp_path, **kw):
    model, inputs, plan = targets(name)
    suffix = ".onnx" if fmt.startswith("onnx") else ".pt2"
    form = "custom" if fmt == "onnx-custom" else "portable"
    return vsopt.export(model, inputs, plan, fmt.split("-")[0], tmp_path / f"{name}{suffix}", onnx_form=form, **kw), \
        (model, inputs, plan)


def _assert_every_site_optimized(result, plan):
    assert [s.site_id for s in result.optimized] == list(plan.sites)
    assert not result.dense


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fmt", ["pt2", "onnx", "onnx-custom"])
def test_format_matches_the_eager_optimized_model(targets, name, fmt, tmp_path):
    result, (_, inputs, plan) = _export(targets, name, fmt, tmp_path)
    _assert_every_site_optimized(result, plan)
    assert result.check is not None and result.check.ok, result.check.line()
    if fmt == "onnx-custom":
        assert "equal to the plan" in result.check.message
    else:
        assert result.check.max_rel <= 1e-4
    if fmt == "onnx":   # portable: quantized heads run at the model's precision, said in the table
        assert any("quantization dropped" in n for n in result.notes) and "quant int8" not in result.table()
    assert result.path.is_file() and result.size == result.path.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staging left behind
    text = result.table()
    for word in ("format", "file", "size", "sites", "check", plan and next(iter(plan.sites))):
        assert word in text


@pytest.mark.slow
def test_aoti_package_matches_the_eager_optimized_model(targets, tmp_path):
    """CogVideoX (text before video, every quant mode, a dynamic head); the reference model's
    package is built and checked by test_export_cli (the shipped plan, at its trained size). An
    AOTInductor compile costs half a minute on a CPU runner, so Wan's is not repeated here: its
    ops are the same ops."""
    result, (_, _, plan) = _export(targets, "cogvideox", "aoti", tmp_path)
    _assert_every_site_optimized(result, plan)
    assert result.check.ok and result.check.max_rel <= 1e-4, result.check.line()


def test_portable_onnx_can_fake_quantize_with_standard_ops(targets, tmp_path):
    _, _, plan = targets("wan")
    quantized = {h.quant.value for sp in plan.sites.values() for h in sp.heads} - {"none"}
    faked, _ = _export(targets, "wan", "onnx", tmp_path, onnx_quant="fake")
    assert faked.check.ok and faked.check.max_rel <= 1e-4, faked.check.line()   # a small model: no rounding flips
    assert all(q in faked.table() for q in quantized)


def test_pt2_loads_in_this_process_with_the_sites_on_its_nodes(targets, tmp_path):
    result, (model, inputs, plan) = _export(targets, "cogvideox", "pt2", tmp_path, check=False)
    run = load(result.path)
    with torch.no_grad():
        got = run(*inputs)
        want = model(*inputs).sample
    assert isinstance(got, tuple) and len(got) == 1
    assert max_rel_err(got[0], want) < 0.5          # the plan changes the model; the fresh check is the exact one
    program = torch.export.load(str(result.path))
    sites = {n.meta["custom"]["vsopt"]["site_id"] for n in program.graph.nodes
             if n.op == "call_function" and "vsopt" in (n.meta.get("custom") or {})}
    assert sites == set(plan.sites)


def test_a_step_ranged_plan_exports_the_chosen_step(targets, tmp_path):
    from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity, StepPlan

    model, inputs, plan = targets("wan")
    site = next(iter(plan.sites.values()))
    skip = (HeadPlan(Sparsity.SKIP, block_m=16, block_n=16),) * site.num_heads
    ranged = Plan({site.site_id: SitePlan(site.site_id, site.num_heads, site.q_len, site.kv_len, site.grid,
                                          (HeadPlan(block_m=16, block_n=16),) * site.num_heads,
                                          (StepPlan(2, None, skip),))})
    dense = vsopt.export(model, inputs, ranged, "pt2", tmp_path / "a.pt2", check=False)
    late = vsopt.export(model, inputs, ranged, "pt2", tmp_path / "b.pt2", step=3, check=False)
    assert not dense.optimized and [s.site_id for s in late.optimized] == [site.site_id]
    assert any("step ranges" in n for n in dense.notes) and any("step 3" in n for n in late.notes)
