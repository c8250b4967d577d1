"""Inductor's on-disk caches must not reuse a graph compiled against other code of vsopt's ops.

AOTAutograd keys a graph by its nodes, and a torch.ops.vsopt.* node by its name only, so an edit
to what the op's body runs (a reference of kernels/) used to be invisible to the key: the fuzz
test's int8_fp8 head ran a stale compiled reference without the FP8 rounding of P (issue 16's
defect, 1.6e-2 rel L2). vsopt.inductor.CACHE_KEY carries a fingerprint of that code.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import vsopt.inductor
from vsopt.core.ir import TokenGrid
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity


def test_fingerprint_follows_the_source(tmp_path, monkeypatch):
    pkg = tmp_path / "fp_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "ref.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = vsopt.inductor.op_source_fingerprint(("fp_pkg",))
    assert first == vsopt.inductor.op_source_fingerprint(("fp_pkg",))
    (pkg / "sub" / "ref.py").write_text("x = 2\n")
    assert vsopt.inductor.op_source_fingerprint(("fp_pkg",)) != first
    sys.modules.pop("fp_pkg", None)
    # the real key covers the references the ops run on CPU
    assert vsopt.inductor.op_source_fingerprint() in vsopt.inductor.CACHE_KEY


class _Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.3)


def _compile_once(model, plan, grid, q, k, v):
    torch._dynamo.reset()
    return torch.compile(model, backend="vsopt", options={"plan": plan, "grid": grid, "strict": True},
                         dynamic=False)(q, k, v)


def test_changed_op_code_misses_the_disk_cache(tmp_path, monkeypatch):
    """Same graph, same inputs: the second compile reuses the disk entry; with another
    fingerprint of the ops' code (what an edit of a reference gives) it compiles afresh."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    import vsopt

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    grid = TokenGrid(2, 4, 4)
    q, k, v = (torch.randn(1, 1, grid.num_tokens, 8) for _ in range(3))
    model = _Attn()
    site_id = vsopt.inspect(model, q, k, v).sites[0].site_id
    hp = (HeadPlan(Sparsity.DENSE, quant=Quant.INT8_FP8, block_m=16, block_n=16),)
    plan = Plan({site_id: SitePlan(site_id, 1, grid.num_tokens, grid.num_tokens, grid, hp)})
    with inductor_config.patch(fx_graph_cache=True, force_disable_caches=False), \
            torch._functorch.config.patch(enable_autograd_cache=True):
        def hits():
            return counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]

        counters.clear()
        want = _compile_once(model, plan, grid, q, k, v)
        assert hits() == 0
        got = _compile_once(model, plan, grid, q, k, v)
        assert hits() > 0, dict(counters)   # the cache works: the check below can fail
        torch.testing.assert_close(got, want)
        counters.clear()
        monkeypatch.setattr(vsopt.inductor, "CACHE_KEY", vsopt.inductor.CACHE_KEY + "-edited")
        again = _compile_once(model, plan, grid, q, k, v)
        assert hits() == 0, dict(counters)
        torch.testing.assert_close(again, want)
