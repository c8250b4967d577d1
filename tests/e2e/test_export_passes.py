"""The passes on a torch.export program: sites detected and rewritten, numbers equal, and the
rewritten graph exports again (the op has a fake implementation)."""
from __future__ import annotations

import torch

from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig

from ..conftest import max_rel_err, op_names
from . import model_factories


def test_passes_on_exported_program():
    model, inputs = model_factories.videomae()
    with torch.no_grad():
        want = model(*inputs).last_hidden_state
        ep = torch.export.export(model, inputs, strict=False)
        gm, report = trace_and_rewrite(ep, inputs, VsoptConfig())
        assert [s.site_id for s in report.sites] == ["encoder.layer.0.attention.attention",
                                                     "encoder.layer.1.attention.attention"]
        assert [n.meta["vsopt_site"] for n in gm.graph.nodes
                if n.target is torch.ops.vsopt.attention.default] == [s.site_id for s in report.sites]
        assert not [o for o in op_names(gm) if "softmax" in o or "matmul" in o]
        assert max_rel_err(gm(*inputs)[0], want) <= 1e-5
        again = torch.export.export(gm, inputs, strict=False)
        assert op_names(again.module()).count("vsopt.attention.default") == 2
