"""The pass manager (passes/infra.py): the check after every pass names the pass that broke the
graph, the dump writes one file per pass, and each pass's report (created / removed nodes) is
kept in the PipelineReport."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vsopt.backend import to_aten
from vsopt.core.config import VsoptConfig
from vsopt.core.errors import PassError
from vsopt.passes import DEFAULT_PIPELINE, PassContext, PassReport, PipelineOptions, run_pipeline
from vsopt.passes import detect_attention, rewrite_attention

aten = torch.ops.aten


class Attn(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v) * 2.0


def _graph():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    return to_aten(Attn(), (q, k, v)), (q, k, v)


def _pass(name: str, edit) -> types.ModuleType:
    """A pass module `name` whose run applies edit(gm)."""
    mod = types.ModuleType(name)
    mod.NAME = name

    def run(gm, ctx):
        edit(gm)
        return PassReport(name)

    mod.run = run
    return mod


def _add_relu_without_meta(gm):
    """A node with no shape metadata, as a pass that forgot graph_edit.emit would leave."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    x = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    with gm.graph.inserting_before(out):
        relu = gm.graph.call_function(aten.relu.default, (x,))
    out.replace_input_with(x, relu)


def _use_before_definition(gm):
    """Move the last compute node to the top of the graph: its inputs are then defined after it."""
    last = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    first.prepend(last)


@pytest.mark.parametrize("edit, problem", [(_add_relu_without_meta, "no shape metadata"),
                                           (_use_before_definition, "graph.lint()")],
                         ids=["missing-meta", "lint"])
def test_check_after_each_pass_names_the_pass_that_broke_the_graph(edit, problem):
    gm, _ = _graph()
    pipeline = [detect_attention, _pass("breaks_graph", edit), rewrite_attention]
    with pytest.raises(PassError) as info:
        run_pipeline(gm, PassContext(config=VsoptConfig()), pipeline, PipelineOptions(check_each_pass=True))
    err = info.value
    assert err.pass_name == "breaks_graph" and err.ran_before == ("detect_attention",)
    assert problem in str(err) and "breaks_graph" in str(err)


def test_without_the_check_a_missing_meta_goes_unnoticed():
    """The check is an option: off, a pass that leaves a node without meta["val"] is not stopped."""
    gm, inputs = _graph()
    pipeline = [detect_attention, _pass("breaks_graph", _add_relu_without_meta), rewrite_attention]
    report = run_pipeline(gm, PassContext(config=VsoptConfig()), pipeline)
    assert [p.name for p in report.passes] == ["detect_attention", "breaks_graph", "rewrite_attention"]
    torch.testing.assert_close(gm(*inputs), torch.relu(Attn()(*inputs)))


def test_the_default_pipeline_passes_its_own_check():
    gm, inputs = _graph()
    report = run_pipeline(gm, PassContext(config=VsoptConfig()), DEFAULT_PIPELINE,
                          PipelineOptions(check_each_pass=True))
    assert len(report.sites) == 1
    torch.testing.assert_close(gm(*inputs), Attn()(*inputs))


def test_dump_writes_one_file_per_pass(tmp_path):
    gm, _ = _graph()
    run_pipeline(gm, PassContext(config=VsoptConfig()), DEFAULT_PIPELINE, PipelineOptions(dump_dir=tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"{i:02d}-{p.NAME}.txt" for i, p in enumerate(DEFAULT_PIPELINE, start=1)]
    at = {p.NAME: i for i, p in enumerate(DEFAULT_PIPELINE, start=1)}   # ring_attention runs before detection
    detect = (tmp_path / f"{at['detect_attention']:02d}-detect_attention.txt").read_text()
    rewrite = (tmp_path / f"{at['rewrite_attention']:02d}-rewrite_attention.txt").read_text()
    assert rewrite.startswith(f"# graph after pass {at['rewrite_attention']}: rewrite_attention\n"
                              "# created: attention_default\n# removed: scaled_dot_product_attention\n")
    detect, rewrite = (text[text.index("graph():"):] for text in (detect, rewrite))  # the graphs, without headers
    assert "scaled_dot_product" in detect and "vsopt.attention" not in detect
    assert "vsopt.attention" in rewrite and "scaled_dot_product" not in rewrite
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_each_pass_report_names_the_nodes_it_created_and_removed():
    gm, _ = _graph()
    before = {n.name for n in gm.graph.nodes}
    report = run_pipeline(gm, PassContext(config=VsoptConfig()), DEFAULT_PIPELINE)
    assert [p.name for p in report.passes] == [p.NAME for p in DEFAULT_PIPELINE]
    by_name = {p.name: p for p in report.passes}
    rw = by_name["rewrite_attention"]
    after = {n.name for n in gm.graph.nodes}
    assert set(rw.created) == after - before and "attention_default" in rw.created
    assert set(rw.removed) == before - after and any("scaled_dot_product" in n for n in rw.removed)
    assert all(not by_name[p].changed for p in ("detect_attention", "infer_grid", "lower_plan", "cancel_permutations"))
