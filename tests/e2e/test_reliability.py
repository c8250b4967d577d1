"""What the backend promises (docs/RELIABILITY.md): it never changes a result on its own, it says
what it left dense and why, and it runs what Dynamo hands it instead of failing into eager."""
from __future__ import annotations

import torch
import torch.nn as nn


class DropoutAttention(nn.Module):
    def __init__(self, p: float = 0.1):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.drop((q @ k.transpose(-1, -2) * 0.3).softmax(-1)) @ v


def test_dynamic_shapes_with_dropout_compile():
    """dynamic=True makes Dynamo pass nn.Dropout's p as a 0-d tensor read with .item(); the
    re-trace used to fail on aten._local_scalar_dense and Dynamo ran the model eagerly."""
    model = DropoutAttention().eval()
    x = torch.randn(2, 5, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vsopt", dynamic=True, fullgraph=True)  # a failure raises
    torch.testing.assert_close(compiled(x), model(x))
    y = torch.randn(3, 7, 8)  # another shape: the same graph (no recompilation needed)
    torch.testing.assert_close(compiled(y), model(y))


def _query_axis_softmax(q, k, v):
    return (q @ k.transpose(-2, -1) * 0.125).softmax(dim=-2) @ v  # over the queries: not attention


def _no_compile_caches():
    """Inductor's on-disk caches off: its joint-graph passes run (and count) on every compile."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    return inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False)


def test_inductor_does_not_fuse_what_vsopt_left_alone():
    """Inductor's SDPA patterns match any softmax dim (torch 2.13/2.14 fuse softmax(dim=-2) into
    SDPA): vsopt's Inductor call leaves them out. The plain-Inductor result is printed, not asserted
    (a torch that fixes it must not fail this test)."""
    from torch._dynamo.utils import counters

    q, k, v = (torch.randn(2, 4, 64, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    want = _query_axis_softmax(q, k, v)
    inductor_caches, aot_caches = _no_compile_caches()
    with inductor_caches, aot_caches:
        torch._dynamo.reset()
        counters.clear()
        plain = torch.compile(_query_axis_softmax, backend="inductor")(q, k, v)
        print("plain inductor: relative L2", float((plain - want).norm() / want.norm()),
              "fuse_attention", counters["inductor"]["fuse_attention"])
        torch._dynamo.reset()
        counters.clear()
        got = torch.compile(_query_axis_softmax, backend="vsopt")(q, k, v)
    assert counters["inductor"]["fuse_attention"] == 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_only_the_attention_fusions_are_left_out():
    """The other joint-graph patterns still run, and Inductor's cache keys say what was left out
    (a graph compiled with the fusion is never reused), chained with the user's own pass."""
    import torch._inductor.config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass
    from torch._inductor.fx_passes import joint_graph

    from vsopt.inductor import CACHE_KEY, is_attention_fusion, without_attention_fusion
    from vsopt.kernels.block_sparse import route

    torch._dynamo.reset()
    torch.compile(_query_axis_softmax, backend="vsopt")(*(torch.randn(1, 2, 8, 4) for _ in range(3)))
    entries = [e for p in joint_graph.pass_patterns for es in p.patterns.values() for e in es]
    assert any(is_attention_fusion(e) for e in entries) and not all(is_attention_fusion(e) for e in entries)

    ran = []

    class UserPass(CustomGraphPass):
        def __call__(self, graph):
            ran.append(graph)

        def uuid(self):
            return "user"

    with inductor_config.patch(joint_custom_pre_pass=UserPass()):
        with without_attention_fusion():
            assert joint_graph.pass_patterns[0].inner is joint_graph.patterns
            key_pass = inductor_config.joint_custom_pre_pass
            assert key_pass.uuid() == (CACHE_KEY, route.cache_tag(), "user")
            key_pass("graph")
        assert ran == ["graph"] and isinstance(inductor_config.joint_custom_pre_pass, UserPass)
    assert joint_graph.pass_patterns[0] is joint_graph.patterns


# ----------------------------------------------------------------------------- what was left dense

import logging  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vsopt  # noqa: E402
from vsopt.core.ir import TokenGrid  # noqa: E402
from vsopt.core.patterns import LocalWindow  # noqa: E402
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity  # noqa: E402

GRID = TokenGrid(2, 4, 4)
WINDOW = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(1, 1, 1), block_m=16, block_n=16)


class Blocks(nn.Module):
    """Two attention blocks over a video grid: blocks.0.attn and blocks.1.attn."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": _Sdpa()}) for _ in range(2))

    def forward(self, q, k, v):
        for b in self.blocks:
            q = b["attn"](q, k, v)
        return q


class _Sdpa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def _qkv(heads=2, n=GRID.num_tokens):
    return tuple(torch.randn(1, heads, n, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))


def _plan(heads=2, grid=GRID, ids=("blocks.0.attn", "blocks.1.attn"), head=WINDOW) -> Plan:
    n = grid.num_tokens
    return Plan({sid: SitePlan(sid, heads, n, n, grid, (head,) * heads) for sid in ids})


def _compile(options, *inputs):
    torch._dynamo.reset()
    return torch.compile(Blocks(), backend="vsopt", options=options)(*inputs)


@pytest.mark.parametrize("plan, says", [
    (_plan(ids=("transformer.0.attn1", "transformer.1.attn1")), "the plan has no entry for this site"),
    (_plan(heads=4), "the plan has 4 heads, the site 2"),
], ids=["another model", "other head count"])
def test_a_plan_that_does_not_fit_says_so(caplog, plan, says):
    with caplog.at_level(logging.INFO, logger="vsopt"):
        _compile({"plan": plan, "grid": GRID}, *_qkv())
    lines = [r for r in caplog.records if r.name == "vsopt" and "runs dense" in r.getMessage()]
    for site in ("blocks.0.attn", "blocks.1.attn"):
        (line,) = [r for r in lines if repr(site) in r.getMessage()]
        assert line.levelno == logging.WARNING and says in line.getMessage()
    report = vsopt.last_report()
    assert report.lowered == [] and [s for s, why in report.dense_sites()] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(says in why for _, why in report.dense_sites())


def test_a_plan_for_another_length_is_fitted_to_the_site_and_says_so(caplog):
    """A plan made at another clip size (3x4x4) follows the resolution (vsopt.core.resample): its
    pattern is derived on the site's grid, and one info line per site gives the density change."""
    with caplog.at_level(logging.INFO, logger="vsopt"):
        _compile({"plan": _plan(grid=TokenGrid(3, 4, 4)), "grid": GRID}, *_qkv())
    assert vsopt.last_report().lowered == ["blocks.0.attn", "blocks.1.attn"]
    fitted = [r.getMessage() for r in caplog.records if r.name == "vsopt" and "fitted to grid" in r.getMessage()]
    assert len(fitted) == 2 and all("3x4x4" in m and "density" in m for m in fitted)


def test_last_report_of_a_fitting_plan_and_of_no_plan(caplog):
    _compile({"plan": _plan(ids=("blocks.0.attn",)), "grid": GRID}, *_qkv())
    report = vsopt.last_report()
    assert report.lowered == ["blocks.0.attn"]
    assert report.dense_sites() == [("blocks.1.attn", "the plan has no entry for this site")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vsopt"):
        _compile({}, *_qkv())
    assert vsopt.last_report().dense_sites() == [("blocks.0.attn", "no plan"), ("blocks.1.attn", "no plan")]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "vsopt")


# ----------------------------------------------------------------------------- strict mode and plans

from vsopt.core.errors import PlanError, UnsupportedSiteError  # noqa: E402


class SelfAndCross(nn.Module):
    """blocks.0.attn: self-attention over the grid; blocks.0.cross: masked cross-attention to text."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": _Sdpa(), "cross": _MaskedSdpa()})])

    def forward(self, q, k, v, text, keep):
        x = self.blocks[0]["attn"](q, k, v)
        return self.blocks[0]["cross"](x, text, text, keep)


class _MaskedSdpa(nn.Module):
    def forward(self, q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _self_and_cross_inputs():
    text = torch.randn(1, 2, 5, 8)
    keep = torch.ones(1, 1, GRID.num_tokens, 5, dtype=torch.bool)
    return (*_qkv(), text, keep)


def _self_and_cross_plan(cross_dense: bool) -> Plan:
    n = GRID.num_tokens
    sites = {"blocks.0.attn": SitePlan("blocks.0.attn", 2, n, n, GRID, (WINDOW,) * 2)}
    if cross_dense:  # dense on purpose: what calibration writes for the sites it keeps dense
        sites["blocks.0.cross"] = SitePlan("blocks.0.cross", 2, n, 5, GRID, (HeadPlan(),) * 2)
    return Plan(sites)


def test_strict_accepts_sites_the_plan_keeps_dense():
    model, inputs = SelfAndCross(), _self_and_cross_inputs()
    torch._dynamo.reset()
    options = {"plan": _self_and_cross_plan(cross_dense=True), "grid": GRID, "strict": True}
    out = torch.compile(model, backend="vsopt", options=options)(*inputs)
    assert out.shape == (1, 2, GRID.num_tokens, 8)
    report = vsopt.last_report()
    assert report.lowered == ["blocks.0.attn"] and report.kept_dense == {"blocks.0.cross": "the plan keeps it dense"}
    torch._dynamo.reset()
    options["plan"] = _self_and_cross_plan(cross_dense=False)
    with pytest.raises(Exception, match="'blocks.0.cross' left as it was: the plan has no entry"):
        torch.compile(model, backend="vsopt", options=options)(*inputs)


def test_strict_inspect_checks_the_plan_against_the_sites_it_finds():
    """inspect runs with rewrite off (no vsopt.attention nodes): a fitting plan is no error, a
    plan that does not fit is the same error as in compile (not 'graph sites: []')."""
    model, inputs = SelfAndCross(), _self_and_cross_inputs()
    options = {"plan": _self_and_cross_plan(cross_dense=True), "grid": GRID, "strict": True}
    report = vsopt.inspect(model, *inputs, options=options)
    assert [s.site_id for s in report.sites] == ["blocks.0.attn", "blocks.0.cross"] and report.skipped == []
    with pytest.raises(UnsupportedSiteError, match="the plan has 4 heads, the site 2"):
        vsopt.inspect(model, *inputs, options={**options, "plan": _plan(heads=4, ids=("blocks.0.attn",))})
    with pytest.raises(PlanError, match=r"plan sites not in this graph: \['blocks.9.attn'\] \(graph sites: \['blocks"):
        vsopt.inspect(model, *inputs, options={**options, "plan": _plan(ids=("blocks.9.attn",))})
