"""Real model code from small configs (diffusers, transformers, timm; random weights, no
downloads): sites found with their grids, rewritten on torch.compile's graph (then Inductor)
and on torch.export's graph, with outputs equal to eager."""
from __future__ import annotations

import pytest
import torch

import vsopt
from vsopt.backend import to_aten, trace_and_rewrite
from vsopt.carried import carry
from vsopt.core.config import VsoptConfig

from ..conftest import max_rel_err, op_names
from . import model_factories

# factory, sites, rule, grid of the sites ("" = unknown)
MODELS = {
    "wan": (4, "sdpa", "2x4x4"),
    "cogvideox": (2, "sdpa", "6+2x4x4"),
    "videomae": (2, "softmax", "2x4x4"),
    "videomae_sdpa": (2, "sdpa", "2x4x4"),
    "timm_vit": (2, "sdpa", "1+1x4x4"),
    "timm_vit_unfused": (2, "softmax", "1+1x4x4"),
}
ATTENTION_OPS = ("softmax", "scaled_dot_product")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_model_sites_and_equality(name, compile_rewrite):
    n_sites, rule, grid = MODELS[name]
    model, inputs = getattr(model_factories, name)()
    with torch.no_grad():
        want = _first_tensor(model(*inputs))
        report = vsopt.inspect(model, *inputs)
        assert len(report.sites) == n_sites and report.skipped == []
        assert {s.rule for s in report.sites} == {rule}
        assert {str(s.grid) for s in report.sites} == {grid}
        assert len({s.site_id for s in report.sites}) == n_sites
        assert all(s.layer is not None for s in report.sites)

        # torch.compile's graph, run as rewritten (all graphs Dynamo produced)
        out, graphs = compile_rewrite(model, *inputs)
        assert [s.site_id for _, r in graphs for s in r.sites] == [s.site_id for s in report.sites]
        assert [str(s.grid) for _, r in graphs for s in r.sites] == [grid] * n_sites
        for gm, _ in graphs:
            assert not [o for o in op_names(gm) if any(a in o for a in ATTENTION_OPS)]
        assert max_rel_err(_first_tensor(out), want) <= 1e-5

        # torch.export's graph
        gm, rep = trace_and_rewrite(model, inputs, VsoptConfig())
        assert op_names(gm).count("vsopt.attention.default") == n_sites
        assert not [o for o in op_names(gm) if any(a in o for a in ATTENTION_OPS)]
        assert max_rel_err(_first_tensor(gm(*inputs)), want) <= 1e-5


def test_wan_compiled_with_inductor():
    """The full backend: torch.compile(backend="vsopt") on the diffusers Wan transformer."""
    torch._dynamo.reset()
    model, inputs = model_factories.wan()
    with torch.no_grad():
        want = model(*inputs).sample
        got = torch.compile(model, backend="vsopt")(*inputs).sample
    assert max_rel_err(got, want) <= 1e-5


def test_mochi_with_a_plan_compiled_with_inductor():
    """The full backend on Mochi under Dynamo's capture of data-dependent shapes, with a sparse plan
    on both joint sites (strict): it compiles through Inductor on the CPU (the split's text keys padded
    to their static bound, its video pieces in buffers of their own: vsopt.core.joint) and equals the
    lowered graph run without Inductor (which test_plan_lowers_on_video_self_attention[mochi] checks
    against the plan's reference), at several text lengths (one graph: the length is data)."""
    model, inputs = model_factories.mochi()
    capture = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
    calls = []
    for valid in (3, 1, 4):
        mask = torch.zeros(1, 4, dtype=torch.bool)
        mask[0, :valid] = True
        calls.append((*inputs[:3], mask))
    with torch._dynamo.config.patch(**capture), torch.no_grad():
        report = vsopt.inspect(model, *inputs)
        video = [s for s in report.sites if s.grid is not None]
        assert sorted(s.site_id for s in video) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
        sparse = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 4, 4), block_m=16, block_n=16)
        plan = Plan({s.site_id: SitePlan.for_site(s, sparse if s in video else HeadPlan()) for s in report.sites})
        options = {"plan": plan, "strict": True}
        wants = []
        for args in calls:
            want, reports = _compiled(model, args, options)
            assert sorted(i for r in reports for i in r.lowered) == sorted(s.site_id for s in video)
            wants.append(want)
        torch._dynamo.reset()
        fn = torch.compile(model, backend="vsopt", options=options)
        for args, want in zip(calls, wants):
            assert max_rel_err(_first_tensor(fn(*args)), want) <= 1e-4
            assert max_rel_err(want, _first_tensor(model(*args))) > 1e-3   # the plan changed the output
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- issue 14: coverage
#
# Every model below, traced as torch.compile traces it (graph breaks allowed): (a) every attention
# found, (b) every site with its true grid, (c) a plan with a sparse pattern, a token order and a
# quant mode lowered on every video self-attention site, with strict mode on (f), (d) compile equal
# to eager without a plan and equal to the plan's reference (semantics.site_output substituted at
# each site of the unplanned graph) with one, (e) inspect reporting what compile rewrites.
# What falls short is an xfail naming the issue-14 class that owns the fix.

from dataclasses import dataclass, field  # noqa: E402
from functools import lru_cache  # noqa: E402

from torch.utils._pytree import tree_leaves  # noqa: E402

from vsopt.calibration.capture import run_observing  # noqa: E402
from vsopt.core import semantics  # noqa: E402
from vsopt.core.orders import TokenOrder  # noqa: E402
from vsopt.core.patterns import LocalWindow  # noqa: E402
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity  # noqa: E402

# one frame's key blocks only (frames are whole 16-token blocks in frame-width-height order), in
# INT8: a sparse pattern, a non-default order and a quant mode at once
SPARSE_HEAD = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 4, 4), order=TokenOrder.FWH, quant=Quant.INT8,
                       block_m=16, block_n=16)


@dataclass(frozen=True)
class Site:
    site_id: str  # the true module path
    rule: str
    grid: str  # the true grid ("" = none: not video tokens)
    video: bool = False  # a video self-attention: the plan gives it SPARSE_HEAD


@dataclass(frozen=True)
class Case:
    sites: tuple[Site, ...]
    options: dict = field(default_factory=dict)
    factory: str = ""  # model_factories' function, if not the case's name
    # target (sites, grids, plan) -> [(xfail reason, the site ids it concerns)]
    xfail: dict = field(default_factory=dict)
    # torch._dynamo.config patched for inspect and compile alike (docs/COVERAGE.md: data-dependent sizes)
    dynamo: dict = field(default_factory=dict)


# Dynamo's capture of data-dependent shapes (nonzero, .item()): the frame that trims text is traced
CAPTURE = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}


def _sites(prefix_rules_grids, video=True):
    return tuple(Site(i, r, g, video) for i, r, g in prefix_rules_grids)


MOCHI_TRIM = ("issue 14 class 1: the joint attention follows the text's data-dependent trim (nonzero) "
              "inside a loop over the batch; under Dynamo's default config that frame runs eagerly, so the "
              "attention is in no graph (the case mochi: with CAPTURE it is)")
CASES = {
    "wan": Case(tuple(Site(f"blocks.{i}.attn{j}", "sdpa", "2x4x4", j == 1) for i in (0, 1) for j in (1, 2))),
    "cogvideox": Case(_sites([(f"transformer_blocks.{i}.attn1", "sdpa", "6+2x4x4") for i in (0, 1)])),
    "videomae": Case(_sites([(f"encoder.layer.{i}.attention.attention", "softmax", "2x4x4") for i in (0, 1)])),
    "videomae_sdpa": Case(_sites([(f"encoder.layer.{i}.attention.attention", "sdpa", "2x4x4") for i in (0, 1)])),
    "timm_vit": Case(_sites([(f"blocks.{i}.attn", "sdpa", "1+1x4x4") for i in (0, 1)])),
    "timm_vit_unfused": Case(_sites([(f"blocks.{i}.attn", "softmax", "1+1x4x4") for i in (0, 1)])),
    "hunyuan_video": Case(
        (Site("context_embedder.token_refiner.refiner_blocks.0.attn", "sdpa", ""),
         Site("transformer_blocks.0.attn", "sdpa", "2x4x4+4", True),
         Site("single_transformer_blocks.0.attn", "sdpa", "2x4x4+4", True))),
    "hunyuan_video15": Case(
        (Site("context_embedder.token_refiner.refiner_blocks.0.attn", "sdpa", ""),
         Site("transformer_blocks.0.attn", "sdpa", "2x4x4+10", True)),
        # the joint site's graph (the block's own frame, after the graph break) holds no patch embedding:
        # the grid is carried from the graph whose output is the block's input (vsopt/carried.py)
        options={"check_masks_on_device": True}),
    # the same with the grid given, as the strict message says; the joint mask is built in eager code (a
    # graph input: unprovable), so the split runs with its video block checked on the device
    "hunyuan_video15_grid": Case(
        (Site("context_embedder.token_refiner.refiner_blocks.0.attn", "sdpa", ""),
         Site("transformer_blocks.0.attn", "sdpa", "2x4x4+10", True)),
        options={"grids": {"transformer_blocks.0.attn": {"frames": 2, "height": 4, "width": 4, "text_after": 10}},
                 "check_masks_on_device": True},
        factory="hunyuan_video15"),
    # the text cut to its unpadded length (nonzero): under CAPTURE the processor's frame is traced, the
    # joint sequence is 32 video tokens + a data-dependent count; the site is its static part
    "mochi": Case(
        (Site("time_embed.pooler", "sdpa", ""),
         Site("transformer_blocks.0.attn1", "sdpa", "2x4x4", True),
         Site("transformer_blocks.1.attn1", "sdpa", "2x4x4", True)),
        dynamo=CAPTURE),
    # the same under Dynamo's defaults: the processor's frame runs eagerly, the attention is in no graph
    "mochi_default": Case(
        (Site("time_embed.pooler", "sdpa", ""),
         Site("transformer_blocks.0.attn1", "sdpa", "2x4x4", True),
         Site("transformer_blocks.1.attn1", "sdpa", "2x4x4", True)),
        factory="mochi",
        xfail={"sites": [(MOCHI_TRIM, ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"))],
               "grids": [(MOCHI_TRIM, ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"))],
               "plan": [(MOCHI_TRIM, ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"))]}),
    # pre-patchified input (B, F*H*W, C): the grid is the user's (class 7: there is no patch embedding)
    "ltx_video": Case(tuple(Site(f"transformer_blocks.{i}.attn{j}", "sdpa", "2x4x4", j == 1)
                            for i in (0, 1) for j in (1, 2)), options={"grid": (2, 4, 4)}),
    "allegro": Case(tuple(Site(f"transformer_blocks.{i}.attn{j}", "sdpa", "2x4x4", j == 1)
                          for i in (0, 1) for j in (1, 2))),
    "cogvideox15": Case(_sites([(f"transformer_blocks.{i}.attn1", "sdpa", "6+2x4x4") for i in (0, 1)])),
    "timesformer": Case(
        (Site("encoder.layer.0.temporal_attention.attention", "softmax", "2x1x1", True),
         Site("encoder.layer.0.attention.attention", "softmax", "1+1x4x4", True))),
    "vivit": Case(_sites([(f"layers.{i}.attention", "sdpa", "1+2x4x4") for i in (0, 1)])),
}


def _groups(target: str):
    """pytest params: per model the sites that must hold, and per known shortfall (strict xfail,
    its reason naming the owning class) the sites it concerns."""
    params = []
    for name, case in CASES.items():
        shortfalls = [(reason, tuple(i for i in ids if target != "plan" or _site(name, i).video))
                      for reason, ids in case.xfail.get(target, [])]
        failing = {i for _, ids in shortfalls for i in ids}
        ok = tuple(s.site_id for s in case.sites if s.site_id not in failing and (target != "plan" or s.video))
        if ok:
            params.append(pytest.param(name, ok, id=name))
        for k, (reason, ids) in enumerate(s for s in shortfalls if s[1]):
            params.append(pytest.param(name, ids, id=f"{name}-xfail{k}",
                                       marks=pytest.mark.xfail(strict=True, reason=reason)))
    return params


def _site(name: str, site_id: str) -> Site:
    return next(s for s in CASES[name].sites if s.site_id == site_id)


def _compiled(model, inputs, options=None):
    """torch.compile(model) with a backend that runs vsopt's passes on every graph Dynamo produces
    (graph breaks allowed, as torch.compile allows them) and runs the rewritten ATen graph as it is
    (no Inductor). Returns (output, [PipelineReport per graph])."""
    reports = []
    config = VsoptConfig.from_options(options)

    def backend(gm, example_inputs):
        def build(g):
            out_gm, report = trace_and_rewrite(g, example_inputs, config)
            reports.append(report)
            return out_gm

        return carry(gm, example_inputs, build, to_aten)  # the tokens carried across graphs, as the vsopt backend

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*inputs)
    return _first_tensor(out), reports


@lru_cache(maxsize=None)
def _traced(name: str):
    """The model, its inputs, eager output, inspect's report and compile's (output, reports): traced
    once per model for the tests that only read them."""
    model, inputs = getattr(model_factories, CASES[name].factory or name)()
    options = CASES[name].options
    with torch.no_grad():
        want = _first_tensor(model(*inputs))
    with torch._dynamo.config.patch(**CASES[name].dynamo):
        report = vsopt.inspect(model, *inputs, options=options)
        out, reports = _compiled(model, inputs, options)
    return model, inputs, want, report, out, reports


@pytest.mark.parametrize("name, ids", _groups("sites"))
def test_every_attention_is_found(name, ids):
    """(a): the sites (true module paths, rule) and no candidate left alone."""
    _, _, _, report, _, _ = _traced(name)
    found = {s.site_id: s for s in report.sites}
    assert report.skipped == [], report.table()
    for site_id in ids:
        assert site_id in found, report.table()
        assert found[site_id].rule == _site(name, site_id).rule
    missing = {i for _, xfailed in CASES[name].xfail.get("sites", []) for i in xfailed}  # their own xfail
    assert len(report.sites) == len(CASES[name].sites) - len(missing), report.table()


@pytest.mark.parametrize("name, ids", _groups("grids"))
def test_every_site_gets_its_true_grid(name, ids):
    """(b)."""
    _, _, _, report, _, _ = _traced(name)
    found = {s.site_id: s for s in report.sites}
    for site_id in ids:
        assert site_id in found, report.table()
        assert str(found[site_id].grid or "") == _site(name, site_id).grid, report.table()


@pytest.mark.parametrize("name", list(CASES))
def test_compile_without_plan_equals_eager(name):
    """(d) without a plan: every site found became vsopt.attention, and the output is eager's."""
    _, _, want, _, out, reports = _traced(name)
    assert max_rel_err(out, want) <= 1e-5
    assert all(not r.lowered and set(r.kept_dense) == {s.site_id for s in r.sites} for r in reports)


@pytest.mark.parametrize("name", list(CASES))
def test_inspect_reports_what_compile_rewrites(name):
    """(e): the same sites, in the same order, with the same grids and rules."""
    _, _, _, report, _, reports = _traced(name)
    compiled = [(s.site_id, str(s.grid), s.rule, s.q_len, s.kv_len) for r in reports for s in r.sites]
    assert [(s.site_id, str(s.grid), s.rule, s.q_len, s.kv_len) for s in report.sites] == compiled
    assert [s.site_id for s in report.skipped] == [s.site_id for r in reports for s in r.skipped]
    assert report.graphs == len(reports)


@pytest.mark.parametrize("name, ids", _groups("plan"))
def test_plan_lowers_on_video_self_attention(name, ids):
    """(c), (d) with a plan, (f): SPARSE_HEAD on the video self-attention sites `ids`, every other
    site dense in the plan, strict mode on: each planned site is lowered. Each graph Dynamo produced
    runs three ways on the same inputs: lowered with the plan; its plan reference (the unplanned graph
    with semantics.site_output at each planned site); dense. Lowered equals the reference and is far
    closer to it than dense is (the plan changes what every planned site computes)."""
    model, inputs, _, report, _, _ = _traced(name)
    sites = {s.site_id: s for s in report.sites}
    missing = [i for i in ids if i not in sites]
    assert not missing, f"sites {missing} not found:\n{report.table()}"
    plan = Plan({s.site_id: SitePlan.for_site(s, SPARSE_HEAD if s.site_id in ids else HeadPlan(block_m=16, block_n=16))
                 for s in report.sites})
    site_change = {}

    def reference(call):
        if call.site_id not in ids:
            return None
        # a masked (joint) site's plan means the split: video x video by the plan, text dense under the mask;
        # so does a site of data-dependent length (its q_len is the static part, the text after it)
        out = semantics.site_output(sites[call.site_id], plan[call.site_id].heads, call.q, call.k, call.v, call.scale,
                                    mask=call.attn_mask, joint=call.q.shape[2] != sites[call.site_id].q_len)
        site_change[call.site_id] = max(site_change.get(call.site_id, 0.0), max_rel_err(out, call.out))
        # in the strides of the op it replaces: the graph's next view may depend on them
        return torch.empty_strided(call.out.shape, call.out.stride(), dtype=call.out.dtype).copy_(out)

    unplanned_config = VsoptConfig.from_options(CASES[name].options)
    planned_config = VsoptConfig.from_options({**CASES[name].options, "plan": plan, "strict": True})
    lowered, errors = [], []

    def build(gm, example_inputs):
        planned_gm, planned_report = trace_and_rewrite(gm, example_inputs, planned_config)
        lowered.extend(planned_report.lowered)
        dense_gm, _ = trace_and_rewrite(gm, example_inputs, unplanned_config)
        if not planned_report.lowered:
            return dense_gm

        def run(*args):
            got = planned_gm(*args)
            ref, dense = run_observing(dense_gm, args, reference), dense_gm(*args)
            for g, r, d in zip(*(tree_leaves(x) for x in (got, ref, dense))):
                if isinstance(g, torch.Tensor) and g.is_floating_point():
                    errors.append((max_rel_err(g, r), max_rel_err(d, r)))
            return got

        return run

    def backend(gm, example_inputs):
        return carry(gm, example_inputs, lambda g: build(g, example_inputs), to_aten)

    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(**CASES[name].dynamo):
        torch.compile(model, backend=backend)(*inputs)
    assert sorted(lowered) == sorted(ids)
    assert sorted(site_change) == sorted(ids) and min(site_change.values()) > 1e-5, site_change
    assert errors and max(e for e, _ in errors) <= 1e-4, errors
    assert max(e for e, _ in errors) * 10 <= max(d for _, d in errors), errors


def test_inspect_says_how_to_trace_a_frame_cut_by_a_data_dependent_size():
    """Mochi under Dynamo's defaults: its joint attention is in no graph, and inspect's notes name the
    Dynamo config that traces it (the case mochi, with it, finds both joint sites)."""
    _, _, _, report, _, _ = _traced("mochi_default")
    assert "capture_dynamic_output_shape_ops=True" in "\n".join(report.notes), report.notes
    _, _, _, captured, _, _ = _traced("mochi")
    assert not [n for n in captured.notes if "capture_dynamic_output_shape_ops" in n]


def test_compile_says_so_when_dynamo_leaves_a_data_dependent_frame_eager(monkeypatch, caplog):
    """torch.compile(backend="vsopt") on Mochi under Dynamo's defaults: the processor frame runs
    eagerly (nonzero breaks the graph inside a loop), and the backend's log names the frame and the
    Dynamo config that traces it (a warning under a plan: the plan's joint sites cannot apply)."""
    import logging

    import vsopt.backend as backend
    import vsopt.inductor
    from torch._dynamo.utils import counters

    monkeypatch.setattr(vsopt.inductor, "compile_fx", lambda gm, inputs: gm)
    monkeypatch.setattr(backend, "_told_left_out", set())
    model, inputs = model_factories.mochi()
    counters.clear()
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="vsopt"):
        torch.compile(model, backend="vsopt")(*inputs)
    torch._dynamo.reset()
    lines = [r.getMessage() for r in caplog.records if "data-dependent shapes" in r.getMessage()]
    assert lines and len(lines) == len(set(lines)), lines   # said again only as Dynamo leaves more out
    assert all("capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True" in line for line in lines)
    assert "frames run eagerly: __call__" in lines[-1] and "attention_processor.py" in lines[-1]   # the processor
    # and nothing is said where Dynamo left nothing out
    caplog.clear()
    counters.clear()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True), \
            torch.no_grad(), caplog.at_level(logging.INFO, logger="vsopt"):
        torch.compile(model, backend="vsopt")(*inputs)
    torch._dynamo.reset()
    assert not [r for r in caplog.records if "data-dependent shapes" in r.getMessage()]
