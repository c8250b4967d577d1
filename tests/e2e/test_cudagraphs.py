"""options={"cudagraphs": True} (issue 15 item 2), checked on the CPU: the option is validated,
forwarded to Inductor as mode="reduce-overhead"'s config patch, parameters and vsopt's constants
reach the cudagraph trees as static inputs (not copied at every replay), step-ranged plans compile
every segment with it, and a dynamic head's mask reuse is turned off (a replayed graph cannot
decide it). On the CPU Inductor itself runs the graph without CUDA graphs, so outputs are
compared with the same compile without the option."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vsopt
from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import DynamicSpec
from vsopt.core.errors import ConfigError
from vsopt.core.ir import TokenGrid
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity, StepPlan

GRID = TokenGrid(2, 4, 4)


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x):  # x (B, N, 32), 2 heads of 16
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_cudagraphs_option_must_be_a_bool(value):
    with pytest.raises(ConfigError, match="option 'cudagraphs' must be True or False"):
        VsoptConfig.from_options({"cudagraphs": value})
    assert VsoptConfig.from_options({"cudagraphs": True}).cudagraphs
    assert not VsoptConfig.from_options({}).cudagraphs


@pytest.fixture
def inductor_calls(monkeypatch):
    """Every compile_fx call: its config_patches and the static_input_idxs (with the number of
    inputs) that reach Inductor's inner compile, where the cudagraph trees get them."""
    from torch._inductor import compile_fx as inductor

    real, calls, depth = inductor.compile_fx, [], [0]

    def spy(gm, example_inputs, inner_compile=inductor.compile_fx_inner, config_patches=None, **kw):
        if depth[0]:  # compile_fx calls itself once to apply config_patches
            return real(gm, example_inputs, inner_compile=inner_compile, config_patches=config_patches, **kw)
        call = {"patches": config_patches, "static": None, "inputs": None}
        calls.append(call)

        def inner(g, inputs, **k):
            call["static"], call["inputs"] = tuple(k.get("static_input_idxs", ())), len(inputs)
            return inner_compile(g, inputs, **k)

        depth[0] += 1
        try:
            return real(gm, example_inputs, inner_compile=inner, config_patches=config_patches, **kw)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(inductor, "compile_fx", spy)
    # no cached graphs: a cache hit skips the inner compile this watches. The configs' own patch(),
    # not monkeypatch: pytest >= 9.2 deletes a config module's attribute on undo
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield calls


def _window_plan(model, x, steps=()):
    from vsopt.backend import trace_and_rewrite

    _, report = trace_and_rewrite(model, (x,), VsoptConfig(grid=GRID))
    (site,) = report.sites
    window = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16)
    return Plan({site.site_id: SitePlan.for_site(site, window, steps=steps)})


def test_cudagraphs_are_forwarded_with_static_parameters(inductor_calls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = Attn().eval(), torch.randn(1, GRID.num_tokens, 32)
    plan = _window_plan(model, x)
    with torch.no_grad():
        want = torch.compile(model, backend="vsopt", options={"plan": plan, "grid": GRID})(x)
        torch._dynamo.reset()
        got = torch.compile(model, backend="vsopt", options={"plan": plan, "grid": GRID, "cudagraphs": True})(x)
    torch.testing.assert_close(got, want)
    plain, graphed = inductor_calls
    assert not plain["patches"] and graphed["patches"] == {"triton.cudagraphs": True}
    # 4 parameters (qkv and out, weight and bias) + the lowered site's constant buffers are static;
    # the one model input is not
    assert len(plain["static"]) == 0
    assert graphed["inputs"] - len(graphed["static"]) == 1 and len(graphed["static"]) >= 5


def test_every_segment_of_a_step_ranged_plan_gets_cudagraphs(inductor_calls):
    torch._dynamo.reset()
    model, x = Attn().eval(), torch.randn(1, GRID.num_tokens, 32)
    dense = (HeadPlan(block_m=16, block_n=16),) * 2
    plan = _window_plan(model, x, steps=(StepPlan(3, None, dense),))
    compiled = torch.compile(model, backend="vsopt", options={"plan": plan, "grid": GRID, "cudagraphs": True})
    with torch.no_grad():
        for step in (0, 3):
            vsopt.set_denoising_step(step)
            compiled(x)
    vsopt.set_denoising_step(None)
    # one graph per distinct segment (0: the window, also the unknown step's default; 3: dense), each
    # with CUDA graphs and static inputs
    assert len(inductor_calls) == 2
    assert all(c["patches"] == {"triton.cudagraphs": True} and c["inputs"] - len(c["static"]) == 1
               for c in inductor_calls)


def test_mask_reuse_is_off_under_cudagraphs(caplog):
    from vsopt.cudagraphs import plan_for_cudagraphs

    reuse = HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(value=0.5, reuse_steps=2), block_m=16, block_n=16)
    fresh = HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(value=0.5), block_m=16, block_n=16)
    plan = Plan({"a": SitePlan("a", 2, 32, 32, GRID, (reuse, fresh), steps=(StepPlan(2, None, (fresh, reuse)),))})
    with caplog.at_level("WARNING", logger="vsopt.cudagraphs"):
        out = plan_for_cudagraphs(plan)
    assert all(h.dynamic.reuse_steps == 0 for h in out.sites["a"].all_heads())
    assert out.sites["a"].steps[0].start == 2 and out.sites["a"].heads[0].dynamic.value == 0.5
    assert "recomputed at every step at 1 site(s) (a)" in caplog.text
    assert plan_for_cudagraphs(out) is out and plan_for_cudagraphs(None) is None


class Attn64(torch.nn.Module):
    """2 heads of 64 (a head dim the GPU kernel takes) over a 2x8x8 grid."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(128, 384)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 64)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudagraphs_on_the_gpu_capture_static_and_dynamic_heads_without_skips():
    """Every plan kind under CUDA graphs on the GPU: a static pattern head in another token order and
    a dynamic head that asked for mask reuse (turned off), across two step segments; Inductor runs
    every graph with CUDA graphs (no skip) and the replays match the same plan without them."""
    from torch._dynamo.utils import counters

    from vsopt.backend import trace_and_rewrite
    from vsopt.core.orders import TokenOrder

    grid = TokenGrid(2, 8, 8)
    torch.manual_seed(0)
    model = Attn64().cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, grid.num_tokens, 128, device="cuda", dtype=torch.bfloat16)
    _, report = trace_and_rewrite(model, (x,), VsoptConfig(grid=grid))
    (site,) = report.sites
    heads = (HeadPlan(Sparsity.PATTERN, order=TokenOrder.HWF, pattern=LocalWindow(0, 2, 2), block_m=32, block_n=32),
             HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(value=0.5, reuse_steps=3), block_m=32, block_n=32))
    plan = Plan({site.site_id: SitePlan.for_site(site, heads, steps=(StepPlan(2, None, heads[::-1]),))})
    outs = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        skips = counters["inductor"]["cudagraph_skips"]
        compiled = torch.compile(model, backend="vsopt", options={"plan": plan, "grid": grid, "cudagraphs": graphs})
        with torch.no_grad():
            for step in (0, 0, 0, 2, 2, 2):   # warm-up, record, replay, per segment
                vsopt.set_denoising_step(step)
                outs[graphs, step] = compiled(x).float().clone()
        vsopt.set_denoising_step(None)
        assert counters["inductor"]["cudagraph_skips"] == skips
    for step in (0, 2):
        torch.testing.assert_close(outs[True, step], outs[False, step], atol=2e-2, rtol=2e-2)
