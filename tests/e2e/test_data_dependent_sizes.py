"""Issue 14 class 1, the backend's half: under Dynamo configs that capture data-dependent output
shapes (capture_dynamic_output_shape_ops, capture_scalar_outputs), the backend's re-trace to ATen
(vsopt.backend.to_aten) keeps the unbacked sizes symbolic: a model that trims its text by a mask
the way diffusers' Mochi does (nonzero / sum -> the valid text -> joint attention -> F.pad back)
compiles with fullgraph=True (the data-dependent ops are in the graph, not behind a graph break)
and equals eager. Before, F.pad of the unbacked size failed the re-trace with "SymIntArrayRef
expected to contain only concrete integers". Lowering the joint site itself is the passes' part."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

import vsopt
from vsopt.backend import to_aten


class TrimmedTextJoint(torch.nn.Module):
    """Video tokens from a Conv3d patch embedding, text tokens trimmed to the valid ones of the
    mask: `nonzero` (Mochi's MochiAttnProcessor2_0: index_select of the valid positions) or `sum`
    (the valid length as a Python int, then a slice); joint SDPA; the text output padded back to
    its full length with F.pad."""

    def __init__(self, how: str, dim: int = 32, heads: int = 2):
        super().__init__()
        self.how, self.heads = how, heads
        self.patch = torch.nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, clip, text, text_mask):
        video = self.patch(clip).flatten(2).transpose(1, 2)
        B, Nv, C = video.shape
        if self.how == "nonzero":
            valid = text[:, torch.nonzero(text_mask[0]).flatten()]
        else:
            valid = text[:, :int(text_mask.sum())]
        x = torch.cat([video, valid], 1)
        N = x.shape[1]
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        o = self.out(o)
        return o[:, :Nv], F.pad(o[:, Nv:], (0, 0, 0, text.shape[1] - (N - Nv)))


def inputs(valid: int):
    g = torch.Generator().manual_seed(valid)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[:, :valid] = True
    return torch.randn(1, 3, 2, 8, 8, generator=g), torch.randn(1, 9, 32, generator=g), mask


CONFIGS = [("nonzero", {"capture_dynamic_output_shape_ops": True}),
           ("sum", {"capture_scalar_outputs": True}),
           ("nonzero", {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}),
           ("sum", {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True})]


@pytest.mark.parametrize("how,config", CONFIGS, ids=[f"{h}-{'+'.join(c)}" for h, c in CONFIGS])
def test_trimmed_text_compiles_in_one_graph_and_equals_eager(how, config):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = TrimmedTextJoint(how).eval()
    with torch._dynamo.config.patch(**config), torch.no_grad():
        compiled = torch.compile(m, backend="vsopt", fullgraph=True)
        for valid in (5, 7):  # another text length: the same graph, its size is data
            args = inputs(valid)
            got, want = compiled(*args), m(*args)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    report = vsopt.last_report()
    assert len(report.sites) + len(report.skipped) >= 1, "the joint attention must be found"


@pytest.mark.parametrize("how,config", CONFIGS[:2], ids=["nonzero", "sum"])
def test_the_aten_graph_keeps_the_unbacked_sizes(how, config):
    """to_aten of Dynamo's graph: F.pad's output (constant_pad_nd) has its data-dependent size
    as an unbacked symbol, not a number and not an error."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = TrimmedTextJoint(how).eval()
    seen = []

    def backend(gm, example_inputs):
        aten = to_aten(gm, example_inputs)
        pads = [n for n in aten.graph.nodes if n.op == "call_function" and "constant_pad_nd" in str(n.target)]
        seen.append([bool(free_unbacked_symbols(p.args[0].meta["val"])) for p in pads])
        return gm.forward

    with torch._dynamo.config.patch(**config), torch.no_grad():
        torch.compile(m, backend=backend, fullgraph=True)(*inputs(5))
    assert seen == [[True]], seen


def test_trimmed_text_at_several_resolutions_with_dynamic_shapes():
    """dynamic=True: the graph is compiled per resolution (vsopt.backend.PerResolution), re-traced
    at each call's sizes with the text length still data (an unbacked size), Inductor in the same
    fake mode; with the cudagraphs option too (on a CPU Inductor runs without CUDA graphs)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = TrimmedTextJoint("nonzero").eval()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        compiled = torch.compile(m, backend="vsopt", fullgraph=True, dynamic=True, options={"cudagraphs": True})
        for frames, valid in ((2, 5), (3, 5), (3, 8)):
            clip, text, mask = inputs(valid)
            clip = torch.randn(1, 3, frames, 8, 8)
            for g, w in zip(compiled(clip, text, mask), m(clip, text, mask)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            assert vsopt.last_report().sites or vsopt.last_report().skipped
