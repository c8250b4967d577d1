"""Tests of the graph-diff debugger (vsopt.debug) on a hand-written model and a hand-made rewrite.

The rewrite here is written out by hand, as the backend's passes would do it (node.meta
"vsopt_from" / "vsopt_site", AttentionSite / SkippedSite records), so that every expected node
name is known exactly; tests/e2e/test_diff*.py run the real backend."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.fx
import torch.nn as nn

import vsopt.core  # noqa: F401  (registers torch.ops.vsopt.*)
from vsopt.core.errors import ConfigError, VsoptError
from vsopt.core.ir import AttentionSite, Layout, SkippedSite
from vsopt.debug import DiffReport, build_report
from vsopt.debug.graph import diff_graphs, layered_layout, source_location
from vsopt.debug.numeric import ErrorStats, SiteProbe, measure, split_heads
from vsopt.debug.text import render_text
from vsopt.io import load_target as load_factory

HEADS, DIM, TOKENS = 2, 16, 12


class Attention(nn.Module):
    """Self-attention written as matmul -> scale -> softmax -> matmul; softmax_dim=-2 makes it
    something that is not attention (softmax over the query axis), which the rule must decline."""

    def __init__(self, softmax_dim: int = -1):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.softmax_dim = softmax_dim

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * (C // HEADS) ** -0.5
        y = scores.softmax(self.softmax_dim) @ v
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Model(nn.Module):
    """Four residual attention blocks; blocks.2 softmaxes over the wrong axis."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attention(-2 if i == 2 else -1) for i in range(4)])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    return Model().eval(), (torch.randn(1, TOKENS, DIM),)


def hand_rewrite(gm: torch.fx.GraphModule, scale_error: dict[str, float] | None = None):
    """Rewrite each matmul-softmax(-1)-matmul chain into torch.ops.vsopt.attention, the way a pass
    does; sites in `scale_error` get their scale multiplied (an injected error). Returns the sites
    and the skipped candidates."""
    scale_error = scale_error or {}
    sites, skipped = [], []
    for sm in [n for n in gm.graph.nodes if n.target == torch.ops.aten.softmax.int]:
        site_id = list(sm.meta["nn_module_stack"].values())[-1][0]
        if sm.args[1] != -1:
            skipped.append(SkippedSite(site_id, sm.name, f"softmax over axis {sm.args[1]}, not the key axis",
                                       "matmul_softmax_matmul"))
            continue
        mul = sm.args[0]
        mm1, scale = mul.args
        q, kt = mm1.args
        k = kt.args[0]
        (mm2,) = sm.users
        v = mm2.args[1]
        replaced = (kt, mm1, mul, sm, mm2)
        with gm.graph.inserting_before(mm2):
            new = gm.graph.call_function(torch.ops.vsopt.attention.default,
                                         (q, k, v, None, scale * scale_error.get(site_id, 1.0), False))
        new.meta.update(mm2.meta)
        new.meta["vsopt_from"] = ("rewrite_attention", tuple(n.name for n in replaced))
        new.meta["vsopt_site"] = site_id
        mm2.replace_all_uses_with(new)
        for n in reversed(replaced):
            gm.graph.erase_node(n)
        val = q.meta["val"]
        sites.append(AttentionSite(site_id, int(site_id.split(".")[1]), "matmul_softmax_matmul", Layout.BHND,
                                   val.shape[0], HEADS, HEADS, val.shape[-1], val.shape[-1], val.shape[2],
                                   val.shape[2], val.dtype, scale, output_node=mm2.name,
                                   nodes=tuple(n.name for n in replaced)))
    gm.graph.lint()
    gm.recompile()
    return sites, skipped


def export_graph(model, inputs) -> torch.fx.GraphModule:
    return torch.export.export(model, inputs).module()


def make_case(scale_error=None, seed=0):
    """(before, after, sites, skipped, inputs) for the hand-written model."""
    model, inputs = make_model(seed)
    before = export_graph(model, inputs)
    after = export_graph(model, inputs)
    sites, skipped = hand_rewrite(after, scale_error)
    return before, after, sites, skipped, inputs


def make_report(scale_error=None, seed=0, **kw) -> DiffReport:
    before, after, sites, skipped, inputs = make_case(scale_error, seed)
    return build_report(before, after, sites, skipped, inputs=list(inputs), model_name="Model", **kw)


# Names torch.export gives the nodes of blocks 0, 1 and 3 (blocks.2 is left alone).
REPLACED = {"transpose", "matmul", "mul", "softmax", "matmul_1",
            "transpose_2", "matmul_2", "mul_1", "softmax_1", "matmul_3",
            "transpose_6", "matmul_6", "mul_3", "softmax_3", "matmul_7"}


@pytest.fixture(scope="module")
def case():
    return make_case()


@pytest.fixture(scope="module")
def report():
    return make_report()


def test_structure_exact_replaced_created_and_kept_nodes(case):
    before, after, sites, skipped, _ = case
    d = diff_graphs(before.graph, after.graph, {s.site_id: s.nodes for s in sites})
    assert set(d.removed) == REPLACED
    assert set(d.created) == {"attention_default", "attention_default_1", "attention_default_2"}
    compute = {n.name for n in before.graph.nodes if n.op.startswith("call_") and n.users}  # live ops
    assert set(d.kept) == compute - REPLACED
    assert "softmax_2" in d.kept and "matmul_4" in d.kept  # the declined block is untouched
    assert [r.site_ids for r in d.regions] == [["blocks.0"], ["blocks.1"], ["blocks.3"]]
    r0 = d.regions[0]
    assert [n.name for n in r0.before.nodes] == ["transpose", "matmul", "mul", "softmax", "matmul_1"]
    assert [n.op for n in r0.after.nodes] == ["vsopt.attention"]
    assert r0.passes == ["rewrite_attention"]
    # The boundary: q, k, v come from the unbind's getitems, the output goes to transpose_1.
    assert {n.name for n in r0.after.boundary} == {"getitem", "getitem_1", "getitem_2", "transpose_1"}
    # Collapsed timeline: kept runs between the regions add up to every kept node.
    assert sum(n for kind, n in d.timeline if kind == "unchanged") == len(d.kept)
    assert [i for kind, i in d.timeline if kind == "region"] == [0, 1, 2]


def test_structure_of_identical_graphs_is_one_unchanged_run():
    model, inputs = make_model()
    g = export_graph(model, inputs).graph
    d = diff_graphs(g, g)
    assert d.removed == [] and d.created == [] and d.regions == []
    assert d.timeline == [("unchanged", len(d.kept))]


def test_source_location_points_at_the_model_code(case):
    before = case[0]
    node = next(n for n in before.graph.nodes if n.name == "softmax")
    loc = source_location(node)
    assert loc is not None and loc.file == __file__
    assert "softmax" in loc.code
    # a linear's innermost frame is inside torch: the user frame is reported instead
    linear = next(n for n in before.graph.nodes if n.name == "linear")
    assert source_location(linear).file == __file__


def test_layered_layout_orders_producers_before_consumers(report):
    sub = report.structure.regions[0].before
    pos = layered_layout(sub)
    assert set(pos) == {n.name for n in (*sub.nodes, *sub.boundary)}
    for u, v in sub.edges:
        assert pos[u][0] < pos[v][0]


def test_left_alone_site_shows_its_reason(report):
    entry = report.entry("blocks.2")
    assert entry.status == "left alone"
    assert entry.reason == "softmax over axis -2, not the key axis"
    assert entry.rule == "matmul_softmax_matmul" and entry.region is None
    assert entry.source is not None and entry.source.file == __file__
    text = render_text(report)
    assert "blocks.2" in text and "softmax over axis -2, not the key axis" in text


def test_entries_in_execution_order(report):
    assert [e.site_id for e in report.entries] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert [e.status for e in report.entries] == ["rewritten", "rewritten", "left alone", "rewritten"]


def test_exact_rewrite_has_no_error(report):
    num = report.numerical
    assert [s.site_id for s in num.sites] == ["blocks.0", "blocks.1", "blocks.3"]
    for s in num.sites:
        for stats in (s.isolated, s.accumulated, *s.heads_isolated, *s.heads_accumulated):
            assert stats.rel_l2 < 1e-5 and stats.cosine > 1 - 1e-9
        assert len(s.heads_isolated) == HEADS
    assert num.output.rel_l2 < 1e-5 and num.output.psnr > 90
    assert num.first_over_threshold is None


@pytest.mark.parametrize("bad", ["blocks.1", "blocks.3"])
def test_injected_error_is_named_first(bad):
    report = make_report({bad: 8.0})
    num = report.numerical
    assert num.first_over_threshold == bad
    assert num.first_accumulated_over_threshold == bad
    assert num.ranking[0] == bad
    by_id = {s.site_id: s for s in num.sites}
    assert by_id[bad].isolated.rel_l2 > 0.1
    # isolated: every other site is exact; accumulated: sites after the bad one inherit its error
    for sid, s in by_id.items():
        if sid != bad:
            assert s.isolated.rel_l2 < 1e-5
    if bad == "blocks.1":
        assert by_id["blocks.3"].accumulated.rel_l2 > 1e-3
        assert by_id["blocks.0"].accumulated.rel_l2 < 1e-5
    assert num.output.rel_l2 > 1e-3
    assert f"first site over threshold: {bad}" in render_text(report)


def test_isolated_matches_a_plan_with_only_that_site(case):
    """Isolated error of a site == error of a graph in which only that site is perturbed."""
    before, _, _, _, inputs = case
    both = make_report({"blocks.0": 3.0, "blocks.1": 5.0})
    only1 = make_report({"blocks.1": 5.0})
    a = {s.site_id: s for s in both.numerical.sites}["blocks.1"].isolated
    b = {s.site_id: s for s in only1.numerical.sites}["blocks.1"].accumulated
    assert math.isclose(a.rel_l2, b.rel_l2, rel_tol=1e-6) and math.isclose(a.max_abs, b.max_abs, rel_tol=1e-6)


def test_per_head_error_finds_the_perturbed_head():
    """A perturbation in head 1 only shows in head 1."""
    before, after, sites, skipped, inputs = make_case()
    node = next(n for n in after.graph.nodes if n.name == "attention_default_1")
    with after.graph.inserting_after(node):
        noisy = after.graph.call_function(torch.ops.aten.index_add.default,
                                          (node, 1, torch.tensor([1]), torch.full((1, 1, TOKENS, DIM // HEADS), 0.5)))
    node.replace_all_uses_with(noisy)
    noisy.args = (node, *noisy.args[1:])
    noisy.meta["vsopt_from"] = ("inject", ("attention_default_1",))
    noisy.meta["vsopt_site"] = "blocks.1"
    after.recompile()
    report = build_report(before, after, sites, skipped, inputs=list(inputs))
    err = {s.site_id: s for s in report.numerical.sites}["blocks.1"]
    assert err.heads_isolated[0].rel_l2 < 1e-6 and err.heads_isolated[1].rel_l2 > 0.1
    assert err.worst_head() == 1


def test_error_stats_against_hand_computed_values():
    expected = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    actual = torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)
    s = ErrorStats.between(actual, expected)
    assert s.rel_l2 == pytest.approx(1.0) and s.max_abs == pytest.approx(5.0)
    assert s.cosine == pytest.approx(5 / math.sqrt(50))
    with pytest.raises(VsoptError, match="shapes"):
        ErrorStats.between(actual, expected[:2])


@pytest.mark.parametrize("layout,shape", [(Layout.BHND, (2, 3, 5, 4)), (Layout.BNHD, (2, 5, 3, 4)),
                                          (Layout.BN_D, (6, 5, 4)), (Layout.BNHD, (2, 3, 5, 4))])
def test_split_heads_finds_the_head_axis(layout, shape):
    """3 heads, 5 tokens: the head axis is found from the shape (an SDPA output is (B, H, N, D)
    even at a site whose q/k/v are BNHD)."""
    t = torch.randn(*shape)
    parts = split_heads(t, 3, 5, layout)
    assert len(parts) == 3
    if len(shape) == 3:
        assert torch.equal(parts[1], t.reshape(2, 3, 5, 4)[:, 1])
    elif shape[1] == 3:
        assert torch.equal(parts[1], t[:, 1])
    else:
        assert torch.equal(parts[1], t[:, :, 1])
    assert split_heads(t, 7, 5, layout) is None and split_heads(t, 3, 6, layout) is None


def test_split_heads_uses_the_layout_when_heads_equal_tokens():
    t = torch.randn(1, 4, 4, 2)
    assert torch.equal(split_heads(t, 4, 4, Layout.BNHD)[1], t[:, :, 1])
    assert torch.equal(split_heads(t, 4, 4, Layout.BHND)[1], t[:, 1])


def test_measure_rejects_missing_nodes_and_bad_threshold(case):
    before, after, sites, _, inputs = case
    probe = SiteProbe("x", "no_such_node", "attention_default", HEADS, TOKENS, Layout.BHND)
    with pytest.raises(VsoptError, match="no_such_node"):
        measure(before, after, [probe], list(inputs))
    with pytest.raises(VsoptError, match="threshold"):
        measure(before, after, [], list(inputs), threshold=-1.0)


def test_trajectory_over_sampler_steps():
    """Over a 3-step Euler loop, the injected error is seen at every step and the state drifts."""
    before, after, sites, skipped, inputs = make_case({"blocks.1": 4.0})

    def sampler(denoise):
        x, states = inputs[0].clone(), []
        for _ in range(3):
            x = x - 0.3 * denoise(x)
            states.append(x)
        return states

    report = build_report(before, after, sites, skipped, sampler=sampler)
    assert report.numerical is None and len(report.steps) == 3
    assert [s.step for s in report.steps] == [0, 1, 2]
    assert all(s.numerical.first_over_threshold == "blocks.1" for s in report.steps)
    drift = [s.state.rel_l2 for s in report.steps]
    assert drift[0] > 1e-4 and drift[2] > drift[0]
    data = json.loads(report.to_json())
    assert len(data["steps"]) == 3 and data["steps"][2]["numerical"]["first_over_threshold"] == "blocks.1"


def test_json_is_stable_across_runs_and_complete():
    a = make_report({"blocks.1": 8.0}).to_json()
    b = make_report({"blocks.1": 8.0}).to_json()
    assert a == b
    data = json.loads(a)
    assert data["version"] == 1
    assert [e["site_id"] for e in data["entries"]] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert data["entries"][2]["reason"] == "softmax over axis -2, not the key axis"
    assert data["numerical"]["first_over_threshold"] == "blocks.1"
    assert set(data["structure"]["removed"]) == REPLACED
    assert [e["region"] for e in data["entries"]] == [0, 1, None, 2]  # indices into structure.regions
    assert data["structure"]["regions"][1]["site_ids"] == ["blocks.1"]
    assert "0x" not in a  # no object addresses


def test_json_encodes_infinite_psnr_as_string(report):
    data = json.loads(report.to_json())
    psnr = data["numerical"]["output"]["psnr"]
    assert isinstance(psnr, float) or psnr == "inf"


def test_write_json_is_atomic_and_leaves_no_temp_files(tmp_path, report):
    out = report.write_json(tmp_path / "sub" / "diff.json")
    assert json.loads(out.read_text())["model"] == "Model"
    assert [p.name for p in out.parent.iterdir()] == ["diff.json"]


def test_terminal_fits_80_columns_and_colour_only_on_request():
    report = make_report({"blocks.3": 8.0})
    plain = render_text(report, width=80, color=False)
    assert "\x1b[" not in plain
    assert max(len(line) for line in plain.splitlines()) <= 80
    for sid in ("blocks.0", "blocks.1", "blocks.2", "blocks.3"):
        assert sid in plain
    assert "PSNR" in plain and "unchanged" in plain
    coloured = render_text(report, width=80, color=True)
    assert "\x1b[" in coloured
    import re
    stripped = re.sub(r"\x1b\[[0-9;]*m", "", coloured)
    assert stripped == plain


def test_load_factory_errors_name_the_problem():
    with pytest.raises(ConfigError, match="MODULE:FACTORY"):
        load_factory("no_colon_here")
    with pytest.raises(ConfigError, match="cannot import"):
        load_factory("vsopt_no_such_module_xyz:make")
    with pytest.raises(ConfigError, match="no callable"):
        load_factory("vsopt.debug:no_such_factory")
    with pytest.raises(ConfigError, match=r"must return \(model, example_inputs\)"):
        load_factory("builtins:dict")


def test_detected_site_declined_later_and_candidate_sharing_an_id(case):
    """A detected site that a later pass declined is 'left alone' with that pass's reason; a
    candidate whose id a rewritten site already has gets its own entry, labelled id@node."""
    before, after, sites, skipped, inputs = case
    declined = AttentionSite("blocks.2", 2, "matmul_softmax_matmul", Layout.BHND, 1, HEADS, HEADS, DIM // HEADS,
                             DIM // HEADS, TOKENS, TOKENS, torch.float32, 0.35, output_node="matmul_5",
                             nodes=("matmul_4", "softmax_2", "matmul_5"))
    extra = [SkippedSite("blocks.2", "matmul_5", "the plan has no entry for this site", "plan"),
             SkippedSite("blocks.0", "linear_1", "not an attention: a test candidate", "probe")]
    report = build_report(before, after, [*sites, declined], extra)
    e2 = report.entry("blocks.2")
    assert e2.status == "left alone" and e2.reason == "the plan has no entry for this site" and e2.site is declined
    assert report.entry("blocks.0").status == "rewritten" and report.entry("blocks.0").reason is None
    dup = report.entry("blocks.0@linear_1")
    assert dup.status == "left alone" and dup.reason == "not an attention: a test candidate"
    assert [e.site_id for e in report.entries] == ["blocks.0", "blocks.0@linear_1", "blocks.1", "blocks.2", "blocks.3"]
    text = render_text(report)
    assert "blocks.0@linear_1" in text and "the plan has no entry for this site" in text


def test_second_pass_replacing_a_created_node_stays_linked_to_the_site(case):
    """A later pass that replaces the vsopt.attention an earlier pass created names only that
    vanished node in its provenance: the region still pairs it with the original ops."""
    before, _, _, _, inputs = case
    model, _ = make_model()
    after = export_graph(model, inputs)
    sites, skipped = hand_rewrite(after)
    old = next(n for n in after.graph.nodes if n.name == "attention_default_1")
    with after.graph.inserting_before(old):
        new = after.graph.call_function(torch.ops.vsopt.attention.default, old.args)
    new.meta.update({"vsopt_from": ("lower_plan", (old.name,)), "vsopt_site": "blocks.1", "val": old.meta["val"]})
    old.replace_all_uses_with(new)
    after.graph.erase_node(old)
    after.recompile()
    report = build_report(before, after, sites, skipped, inputs=list(inputs),
                          pass_order=["rewrite_attention", "lower_plan"])
    region = report.entry("blocks.1").region
    assert [n.name for n in region.before.nodes] == ["transpose_2", "matmul_2", "mul_1", "softmax_1", "matmul_3"]
    assert [n.name for n in region.after.nodes] == [new.name]
    assert region.passes == ["lower_plan"]
    assert len(report.structure.regions) == 3
    assert report.numerical.first_over_threshold is None


def test_a_node_inserted_outside_any_site_is_its_own_region(case):
    """A pass that inserts a node (nothing removed) between kept nodes: a region with no site,
    placed right after the kept node before it, shown as a change outside any site."""
    before, _, _, _, inputs = case
    model, _ = make_model()
    after = export_graph(model, inputs)
    sites, skipped = hand_rewrite(after)
    add = next(n for n in after.graph.nodes if n.name == "add")  # the first residual add
    with after.graph.inserting_after(add):
        scaled = after.graph.call_function(torch.ops.aten.mul.Tensor, (add, 1.0))
    add.replace_all_uses_with(scaled)
    scaled.args = (add, 1.0)
    scaled.meta["vsopt_from"] = ("scale_residual", ())
    after.recompile()
    report = build_report(before, after, sites, skipped, inputs=list(inputs))
    extra = [r for r in report.structure.regions if not r.site_ids]
    assert len(extra) == 1 and extra[0].before.nodes == [] and [n.op for n in extra[0].after.nodes] == ["mul"]
    assert extra[0].passes == ["scale_residual"]
    order = [(k, report.structure.regions[v].site_ids if k == "region" else v) for k, v in report.structure.timeline
             if k != "unchanged"]
    assert order == [("region", ["blocks.0"]), ("region", []), ("region", ["blocks.1"]), ("anchor", "blocks.2"),
                     ("region", ["blocks.3"])]
    assert "change outside any site by scale_residual" in render_text(report)
    assert report.numerical.first_over_threshold is None


def test_accumulated_error_over_threshold_without_any_isolated_one():
    """Small errors at two sites that only together cross the threshold: no site is named as
    where error enters, and the report says where the accumulated error crosses it."""
    probe = make_report({"blocks.0": 1.5, "blocks.1": 1.5}).numerical
    iso = max(s.isolated.rel_l2 for s in probe.sites)
    acc = max(s.accumulated.rel_l2 for s in probe.sites)
    assert acc > iso * 1.01  # the premise: errors compound (blocks.1 inherits blocks.0's)
    report = make_report({"blocks.0": 1.5, "blocks.1": 1.5}, threshold=(iso + acc) / 2)
    num = report.numerical
    assert num.first_over_threshold is None and num.first_accumulated_over_threshold is not None
    text = " ".join(render_text(report).split())
    assert f"the accumulated error crosses it at {num.first_accumulated_over_threshold}" in text
    assert 'class="callout warn"' in report.render_html()


def test_plan_heads_per_head_entries():
    from vsopt.core.ir import TokenGrid
    from vsopt.core.orders import TokenOrder
    from vsopt.core.patterns import LocalWindow
    from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity
    from vsopt.debug import plan_heads

    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, 0] = True
    mask[2, 3] = True  # 5 of 16 blocks
    heads = (HeadPlan(sparsity=Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), order=TokenOrder.HWF, block_m=16,
                      block_n=16),
             HeadPlan(sparsity=Sparsity.MASK, mask=mask, block_m=16, block_n=16),
             HeadPlan(quant=Quant.INT8, block_m=16, block_n=16))
    plan = Plan({"blocks.0": SitePlan("blocks.0", 3, 64, 64, TokenGrid(4, 4, 4), heads)})
    rows = plan_heads(plan, "blocks.0")
    assert [r["sparsity"] for r in rows] == ["pattern", "mask", "dense"]
    assert [r["pattern"] for r in rows] == ["local_window", None, None]
    assert [r["order"] for r in rows] == ["hwf", "fhw", "fhw"] and [r["quant"] for r in rows] == ["none", "none", "int8"]
    assert rows[1]["density"] == 5 / 16 and rows[2]["density"] == 1.0 and 0 < rows[0]["density"] < 1
    assert rows[0]["block"] == [16, 16]
    assert plan_heads(plan, "blocks.9") == [] and plan_heads(None, "blocks.0") == []
