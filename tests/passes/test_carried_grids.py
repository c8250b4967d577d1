"""Grids carried across graphs (issue 14, class 7; vsopt/carried.py, passes/carried_tokens.py): the
patch embedding in one graph, the attention in a block compiled on its own after a graph break (the
blocks run from a frame Dynamo does not compile). The block's input is the very tensor the first
graph returned, so its grid is the first graph's; a block input that did not come from there (an
eager op in between, or another caller) gets no carried grid: the site's note says how to give it,
and a graph compiled with a carried grid runs only for inputs from the same producer."""
import logging

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

import vsopt
from vsopt.core.orders import TokenOrder
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity

from ..conftest import max_rel_err
from .test_site_ids import Block


class Split(nn.Module):
    """Conv3d patch embedding (4x4x4 tokens) in the compiled forward; the blocks in an uncompiled
    frame. eager_op: the frame makes a new tensor first (x * 1), so the block's input is not the
    first graph's output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 16, (1, 2, 2), (1, 2, 2))
        self.blocks = nn.ModuleList([Block(), Block()])
        self.eager_op = False

    def forward(self, video):
        return self.run(self.conv(video).flatten(2).transpose(1, 2))

    @torch.compiler.disable(recursive=False)
    def run(self, x):
        if self.eager_op:
            x = x * 1.0
        for blk in self.blocks:
            x = blk(x)
        return x


def _model():
    torch.manual_seed(0)
    return Split().eval(), (torch.randn(1, 3, 4, 8, 8),)


def test_the_grid_is_carried_into_a_block_compiled_on_its_own():
    model, inputs = _model()
    report = vsopt.inspect(model, *inputs)
    assert [(s.site_id, str(s.grid)) for s in report.sites] == [("blocks.0.attn", "4x4x4"), ("blocks.1.attn", "4x4x4")]


def test_a_tensor_changed_in_eager_code_carries_no_grid_and_the_note_says_how_to_give_it(monkeypatch):
    monkeypatch.setattr(vsopt.inductor, "compile_fx", lambda gm, inputs: gm)
    model, inputs = _model()
    model.eager_op = True
    report = vsopt.inspect(model, *inputs)
    assert [s.grid for s in report.sites] == [None, None]
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="vsopt")(*inputs)
    torch._dynamo.reset()
    notes = [n for p in vsopt.last_report().passes for n in p.notes if n.startswith("site blocks.0.attn: no")]
    assert len(notes) == 1 and "this graph holds no patch embedding" in notes[0]
    assert ("options={'grids': {'blocks.0.attn': {'frames': F, 'height': H, 'width': W, "
            "'text_before': B, 'text_after': A}}} with F * H * W + B + A = 64") in notes[0]


def test_a_carried_grid_applies_only_to_inputs_from_the_same_producer(monkeypatch, caplog):
    """Compiled under a plan sparse on both blocks: the first call lowers with the carried grid (not
    eager's output); a call whose block input comes from eager code runs the graph compiled without
    the carried grid: dense (the plan needs a grid), eager's output."""
    monkeypatch.setattr(vsopt.inductor, "compile_fx", lambda gm, inputs: gm)
    model, inputs = _model()
    sites = vsopt.inspect(model, *inputs).sites
    sparse = HeadPlan(Sparsity.PATTERN, TokenOrder.FHW, pattern=LocalWindow(0, 0, 0), block_m=16, block_n=16)
    plan = Plan({s.site_id: SitePlan.for_site(s, sparse) for s in sites})
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="vsopt"):
        want = model(*inputs)
        compiled = torch.compile(model, backend="vsopt", options={"plan": plan})
        sparse_out = compiled(*inputs)
        model.eager_op = True
        other = compiled(*inputs)
    torch._dynamo.reset()
    assert max_rel_err(sparse_out, want) > 1e-3
    assert max_rel_err(other, want) <= 1e-5
    assert any("do not come from it" in r.getMessage() for r in caplog.records)


def test_only_graphs_returning_video_tokens_record_their_outputs():
    """A graph whose outputs hold no video tokens (a pooled head, an MLP on features) is the compiled
    graph itself: nothing recorded, nothing added to its calls. The patch embedding's graph records
    exactly its token output."""
    import vsopt.carried as carried

    class Head(nn.Module):   # no patch embedding anywhere: its outputs hold no tokens
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(x).softmax(-1), x.mean(1)

    built = []
    to_aten = vsopt.backend.to_aten
    torch._dynamo.reset()
    before = dict(carried._RETURNED)
    with torch.no_grad():
        head, x = Head().eval(), torch.randn(2, 5, 16)
        out = torch.compile(head, backend=lambda gm, ex: built.append(carried.carry(gm, ex, lambda g: g, to_aten))
                            or built[-1])(x)
        assert len(built) == 1 and not hasattr(built[0], "__wrapped__")   # the graph itself, not wrapped
        assert all(id(t) not in carried._RETURNED or carried._RETURNED.get(id(t)) == before.get(id(t))
                   for t in tree_leaves(out))
        model, inputs = _model()
        torch._dynamo.reset()
        built.clear()
        tokens = torch.compile(model, backend=lambda gm, ex: built.append(carried.carry(gm, ex, lambda g: g, to_aten))
                               or built[-1])(*inputs)
    torch._dynamo.reset()
    # the patch embedding's graph and the blocks' (their tokens carried in) record their token outputs
    assert len(built) == 2 and hasattr(built[0], "__wrapped__")
    assert isinstance(built[1], carried.Carrying) and hasattr(built[1].with_carried, "__wrapped__")
    assert [(v.frames, v.height, v.width) for st in carried.carried_into([tokens]).values()
            for v in st.segments if hasattr(v, "frames")] == [(4, 4, 4)]
