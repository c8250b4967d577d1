"""Shared test helpers (kept light: no models are built here)."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. Triton decides that when a
# @triton.jit function is decorated, so it must be set before ANY test module (of any folder,
# collected in any order) imports a launcher: here, in the first conftest pytest loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def op_names(gm: torch.fx.GraphModule) -> list[str]:
    """The targets of gm's call_function nodes, as strings like 'aten.bmm.default'."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.fixture
def compile_rewrite():
    """compile_rewrite(model, *inputs, options=None) -> (output, [(gm, report)] per graph): runs
    torch.compile with a backend that applies vsopt's passes to Dynamo's graph and then runs the
    rewritten ATen graph as it is (no Inductor: fast, and it checks exactly what the passes did)."""
    from vsopt.backend import trace_and_rewrite
    from vsopt.core.config import VsoptConfig

    def run(model, *inputs, options=None):
        graphs = []

        def backend(gm, example_inputs):
            out_gm, report = trace_and_rewrite(gm, example_inputs, VsoptConfig.from_options(options))
            graphs.append((out_gm, report))
            return out_gm

        torch._dynamo.reset()
        out = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
        return out, graphs

    return run


@pytest.fixture
def inductor_graphs(monkeypatch):
    """The ATen graphs vsopt's backend hands to Inductor, in order, run as they are (Inductor's
    compile_fx replaced by one that records the graph: fast, and it shows exactly what Inductor
    would be given)."""
    from vsopt import inductor

    seen = []

    def capture(gm, example_inputs, config_patches=None):
        seen.append(gm)
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", capture)
    return seen
