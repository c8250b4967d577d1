"""Site ids after a graph break (issue 14, class 2): a graph Dynamo starts in a submodule's frame
names modules from that frame's self; the backend places the frame in the compiled module from the
graph's lifted parameters, so site ids are full module paths, and under a plan each module that
runs the same graph gets its own plan entries."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vsopt
import vsopt.inductor
from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity
from vsopt.passes.site_ids import FrameNames, normalize_module_path

from ..conftest import max_rel_err


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 16))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, x):
        return x + self.attn(x)


class Broken(nn.Module):
    """The blocks run from a frame Dynamo does not compile (torch.compiler.disable, non-recursive):
    each block's forward becomes a frame of its own, whose graph names `attn` from the block's self,
    and the second block reuses the first block's graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 16, (1, 2, 2), (1, 2, 2))
        self.stages = nn.ModuleDict({"main": nn.ModuleList([Block(), Block()])})

    def forward(self, video):
        return self.run(self.conv(video).flatten(2).transpose(1, 2))

    @torch.compiler.disable(recursive=False)
    def run(self, x):
        for blk in self.stages["main"]:
            x = blk(x)
        return x


def _model():
    torch.manual_seed(0)
    return Broken().eval(), (torch.randn(1, 3, 4, 8, 8),)


def test_normalize_module_path_spellings():
    for path in ("L['self'].blocks[3].attn1", "L['self']._modules['blocks']._modules['3']._modules['attn1']",
                 "L['self'].__dict__['_modules']['blocks'].3.attn1", "blocks.3.attn1"):
        assert normalize_module_path(path) == "blocks.3.attn1"
    assert normalize_module_path("L['self'].__dict__['_parameters']['weight']") == "_parameters.weight"


def test_site_ids_after_a_graph_break_are_full_module_paths():
    model, inputs = _model()
    report = vsopt.inspect(model, *inputs)
    # block 1 runs block 0's graph: reported placed at each module, as compile plans it (PerModule)
    assert [s.site_id for s in report.sites] == ["stages.main.0.attn", "stages.main.1.attn"]
    assert report.graphs == 3  # the patch embedding's, and the block graph at each module
    assert not [n for n in report.notes if "not a module path" in n], report.notes


def test_inspect_lists_what_compile_lowers_in_a_graph_shared_by_modules(no_inductor, monkeypatch):
    """A plan built from inspect's sites (every one sparse) lowers exactly those sites under compile,
    one graph per module; before, inspect listed block 0's site only, so a plan made from its report
    left block 1 dense."""
    model, inputs = _model()
    grid = {"grid": (4, 4, 4)}
    sites = vsopt.inspect(model, *inputs, options=grid).sites
    sparse = HeadPlan(Sparsity.PATTERN, TokenOrder.FHW, pattern=LocalWindow(0, 0, 0), block_m=16, block_n=16)
    plan = Plan({s.site_id: SitePlan.for_site(s, sparse) for s in sites})
    told = []
    tell = vsopt.backend._tell
    monkeypatch.setattr(vsopt.backend, "_tell", lambda config, reports: (told.extend(reports), tell(config, reports)))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="vsopt", options={"plan": plan, "strict": True, **grid})(*inputs)
    torch._dynamo.reset()
    assert [i for r in told for i in r.lowered] == [s.site_id for s in sites] == ["stages.main.0.attn",
                                                                                   "stages.main.1.attn"]


def test_an_unplaced_frame_says_its_site_id_is_relative(caplog):
    """Dynamo's graph of a block's frame traced outside torch.compile's call (no compiled module on
    the stack): nothing places it, so the id stays 'attn' and the report says it is relative."""
    model, inputs = _model()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=keep)(*inputs)
    torch._dynamo.reset()
    gm, example_inputs = next((g, e) for g, e in graphs
                              if any("scaled_dot" in str(n.target) for n in g.graph.nodes))
    gm.meta["vsopt_frame_names"] = FrameNames(relative=frozenset({"self"}))  # what an unplaced nested frame gets
    with caplog.at_level(logging.INFO, logger="vsopt"):
        _, report = trace_and_rewrite(gm, example_inputs, VsoptConfig())
    assert [s.site_id for s in report.sites] == ["attn"]
    notes = [n for p in report.passes for n in p.notes if "is relative" in n]
    assert notes and "'attn'" in notes[0] and any("is relative" in r.getMessage() for r in caplog.records)


@pytest.fixture
def no_inductor(monkeypatch):
    """The vsopt backend end to end, its rewritten ATen graph run as it is (Inductor on CPU is slow)."""
    monkeypatch.setattr(vsopt.inductor, "compile_fx", lambda gm, inputs: gm)


def test_each_module_running_one_graph_gets_its_own_plan_entry(no_inductor, caplog):
    """Plans sparse on block 0, on block 1, on both: three different outputs, none eager's (block 1
    runs the graph Dynamo compiled for block 0; run with block 0's plan entry, a plan sparse on block
    1 only would give eager's output, and one sparse on block 0 only the same as sparse on both)."""
    model, inputs = _model()
    sparse = HeadPlan(Sparsity.PATTERN, TokenOrder.FHW, pattern=LocalWindow(0, 0, 0), block_m=16, block_n=16)
    grid = {"grid": (4, 4, 4)}  # the block's graph holds no patch embedding
    site = vsopt.inspect(model, *inputs, options=grid).sites[0]
    ids = ["stages.main.0.attn", "stages.main.1.attn"]
    outs = {}
    with torch.no_grad():
        want = model(*inputs)
        for which in ((0,), (1,), (0, 1)):
            plan = Plan({sid: SitePlan.for_site(dataclasses.replace(site, site_id=sid),
                                                sparse if i in which else HeadPlan(block_m=16, block_n=16))
                         for i, sid in enumerate(ids)})
            torch._dynamo.reset()
            with caplog.at_level(logging.INFO, logger="vsopt"):
                outs[which] = torch.compile(model, backend="vsopt", options={"plan": plan, **grid})(*inputs)
            assert vsopt.last_report().lowered == ([ids[1]] if 1 in which else [])  # the last graph: block 1's
    torch._dynamo.reset()
    assert any("compiling a submodule's graph again" in r.getMessage() for r in caplog.records)
    assert min(max_rel_err(o, want) for o in outs.values()) > 1e-3
    assert max_rel_err(outs[(0,)], outs[(0, 1)]) > 1e-3 and max_rel_err(outs[(1,)], outs[(0, 1)]) > 1e-3


def test_a_module_at_two_paths_is_not_placed_by_a_guess(caplog):
    """The same block registered at two paths: its parameters name both, so its frame has no one
    place in the model; the id stays relative and the report says so."""
    model, inputs = _model()
    model.stages["main"][1] = model.stages["main"][0]
    with caplog.at_level(logging.INFO, logger="vsopt"):
        report = vsopt.inspect(model, *inputs)
    assert [s.site_id for s in report.sites] == ["attn"]
    assert any("site id 'attn' is relative" in r.getMessage() for r in caplog.records)
