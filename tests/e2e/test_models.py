"""Real model code from small configs (diffusers, transformers, timm; random weights, no
downloads): sites found with their grids, rewritten on torch.compile's graph (then Inductor)
and on torch.export's graph, with outputs equal to eager."""
from __future__ import annotations

import pytest
import torch

import vsopt
from vsopt.backend import trace_and_rewrite
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
