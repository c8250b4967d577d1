"""A plan with head plans for ranges of denoising steps, through torch.compile(backend="vsopt"):
the backend compiles one graph per segment of steps and runs the one of the current step."""
import torch
import torch.nn.functional as F

import vsopt
from vsopt.backend import trace_and_rewrite
from vsopt.core.config import VsoptConfig
from vsopt.core.ir import TokenGrid
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity, StepPlan

GRID = TokenGrid(2, 4, 4)


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):  # x (B, N, 32), 2 heads of 16
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def _plan(model, x):
    _, report = trace_and_rewrite(model, (x,), VsoptConfig(grid=GRID))
    (site,) = report.sites
    skip = (HeadPlan(Sparsity.SKIP, block_m=16, block_n=16),) * 2
    window = (HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16),) * 2
    # default: dense; steps 2..3: skip every head (output 0); steps >= 6: a local window
    sp = SitePlan.for_site(site, HeadPlan(block_m=16, block_n=16),
                           steps=(StepPlan(2, 4, skip), StepPlan(6, None, window)))
    return Plan({site.site_id: sp})


def test_plan_segments():
    model, x = Attn().eval(), torch.randn(1, GRID.num_tokens, 32)
    plan = _plan(model, x)
    assert plan.step_boundaries() == (2, 4, 6)
    assert [plan.segment_start(s) for s in (None, 0, 1, 2, 3, 4, 5, 6, 99)] == [None, 0, 0, 2, 2, 4, 4, 6, 6]
    site = next(iter(plan.sites.values()))
    assert plan.at_step(3)[site.site_id].heads[0].sparsity is Sparsity.SKIP
    assert plan.at_step(5)[site.site_id].heads[0].sparsity is Sparsity.DENSE and not plan.at_step(5)[site.site_id].steps


def test_compiled_model_follows_the_denoising_step():
    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(1, GRID.num_tokens, 32)
    plan = _plan(model, x)
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vsopt", options={"plan": plan, "grid": GRID})
    window_gm, _ = trace_and_rewrite(model, (x,), VsoptConfig(plan=plan.at_step(6), grid=GRID))
    try:
        with torch.no_grad():
            vsopt.set_denoising_step(None)
            torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)  # unknown step: default (dense)
            vsopt.set_denoising_step(3)
            assert compiled(x).abs().max() == 0  # every head skipped
            vsopt.set_denoising_step(4)
            torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
            vsopt.set_denoising_step(7)
            got = compiled(x)
            torch.testing.assert_close(got, window_gm(x), rtol=1e-5, atol=1e-5)
            assert (got - eager).abs().max() > 1e-3  # the window really is sparser than dense
    finally:
        vsopt.set_denoising_step(None)


class _CountingCompiles:
    """vsopt.inductor.compile_fx, counting the graphs the backend hands to Inductor."""

    def __init__(self, monkeypatch):
        import vsopt.inductor

        self.count, real = 0, vsopt.inductor.compile_fx

        def counting(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(vsopt.inductor, "compile_fx", counting)


def test_one_graph_per_distinct_segment_and_none_for_the_unknown_step(monkeypatch):
    """The plan's segments 0 and 4 run the default (dense) heads, 2 skips, 6 a window: three
    distinct graphs, the unknown step sharing the dense one; nothing more compiles when the step
    is unknown."""
    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(1, GRID.num_tokens, 32)
    plan = _plan(model, x)
    eager = model(x)
    compiles = _CountingCompiles(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vsopt", options={"plan": plan, "grid": GRID})
    try:
        with torch.no_grad():
            vsopt.set_denoising_step(0)
            torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
            assert compiles.count == 3
            for step, dense in ((2, False), (4, True), (6, False), (None, True)):
                vsopt.set_denoising_step(step)
                out = compiled(x)
                assert torch.allclose(out, eager, rtol=1e-5, atol=1e-5) == dense, step
            assert compiles.count == 3
    finally:
        vsopt.set_denoising_step(None)


def test_the_unknown_steps_own_graph_compiles_on_its_first_call_only(monkeypatch):
    """Every step runs the window (a step range from 0 on), the default heads are dense: a sampler
    that sets its steps compiles one graph; a call with no step compiles the default's, then."""
    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(1, GRID.num_tokens, 32)
    sp = _plan(model, x)[next(iter(_plan(model, x).sites))]
    window = sp.steps[-1].heads
    plan = Plan({sp.site_id: SitePlan.for_site(_site(model, x), sp.heads, steps=(StepPlan(0, None, window),))})
    eager = model(x)
    compiles = _CountingCompiles(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vsopt", options={"plan": plan, "grid": GRID})
    try:
        with torch.no_grad():
            vsopt.set_denoising_step(0)
            sparse = compiled(x)
            vsopt.set_denoising_step(9)
            compiled(x)
            assert compiles.count == 1 and (sparse - eager).abs().max() > 1e-3
            vsopt.set_denoising_step(None)
            torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
            assert compiles.count == 2
            compiled(x)
            assert compiles.count == 2
    finally:
        vsopt.set_denoising_step(None)


def _site(model, x):
    _, report = trace_and_rewrite(model, (x,), VsoptConfig(grid=GRID))
    (site,) = report.sites
    return site
