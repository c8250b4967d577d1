"""Softmax-mass correction (Re-ttention) through the lowered graphs and through
torch.compile(backend="vsopt") with the project's sampler: measuring steps write the site's
statistics buffers, correcting steps read them, and the clip is what semantics says step by step."""
import pytest
import torch
import torch.nn.functional as F

from vsopt.backend import trace_and_rewrite
from vsopt.core import semantics
from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import DynamicMethod, DynamicSpec, current_denoising_step, set_denoising_step
from vsopt.core.ir import TokenGrid
from vsopt.core.patterns import LocalWindow
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity
from vsopt.core.rettention import RENORM_STATE, Phase, Renorm, measured_step
from vsopt.models import sampler

C, HEADS, D = 32, 2, 16


class Toy(torch.nn.Module):
    """Wan's signature: one self-attention over the video tokens, projected back to latents."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = gain
        self.qkv = torch.nn.Linear(C, 3 * HEADS * D)
        self.out = torch.nn.Linear(HEADS * D, C)

    def qkv_heads(self, x):
        return self.qkv(x.flatten(2).transpose(1, 2)).unflatten(-1, (3, HEADS, D)).permute(2, 0, 3, 1, 4)

    def finish(self, o, x):
        return (self.gain * self.out(o.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(x.shape),)

    def forward(self, x, timestep, encoder_hidden_states, return_dict=False):
        q, k, v = self.qkv_heads(x)
        return self.finish(F.scaled_dot_product_attention(q, k, v), x)


def _setup(grid, gain=2.0, seed=0):
    torch.manual_seed(seed)
    model = Toy(gain).eval()
    example = (torch.randn(1, C, grid.frames, grid.height, grid.width), torch.tensor([500.0]), torch.randn(1, 3, 8))
    _, report = trace_and_rewrite(model, example, VsoptConfig(grid=grid))
    (site,) = report.sites
    return model, example, site


HEADS_OF = {
    "window": lambda r, rem: (HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16,
                                       remainder=rem, renorm=r),
                              HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16,
                                       order="hwf", remainder=rem, renorm=r)),
    "topk": lambda r, rem: (HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(DynamicMethod.TOP_K, 0.3), block_m=16,
                                     block_n=16, remainder=rem, renorm=r),) * HEADS,
}


@pytest.mark.parametrize("kind, remainder", [("window", "drop"), ("topk", "drop"), ("window", "pooled")])
def test_lowered_measuring_and_correcting_graphs_compute_the_meaning(kind, remainder):
    grid = TokenGrid(3, 3, 5)   # 45 tokens: ragged blocks
    model, example, site = _setup(grid)
    heads = HEADS_OF[kind](Renorm(every=2), remainder)
    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    RENORM_STATE.reset()
    gm_m, _ = trace_and_rewrite(model, example, VsoptConfig(plan=plan.at_step(0), grid=grid))
    gm_c, _ = trace_and_rewrite(model, example, VsoptConfig(plan=plan.at_step(1), grid=grid))
    for gm in (gm_m, gm_c):
        targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert torch.ops.aten._local_scalar_dense.default not in targets   # no host synchronization
        assert torch.ops.vsopt.attention.default not in targets
    bufs = lambda gm: {n: b for n, b in gm.named_buffers() if "renorm_rho" in n or "renorm_resid" in n}  # noqa
    assert [b.data_ptr() for b in bufs(gm_m).values()] == [b.data_ptr() for b in bufs(gm_c).values()]
    x0 = example[0]
    x1 = x0 + 0.3 * torch.randn_like(x0)
    with torch.no_grad():
        nan = gm_c(x1, *example[1:])[0]
        assert torch.isnan(nan).all()           # correcting before any measurement: NaN, not silently wrong
        got_m = gm_m(x0, *example[1:])[0]
        got_c = gm_c(x1, *example[1:])[0]
        m_qkv, c_qkv = model.qkv_heads(x0), model.qkv_heads(x1)
        at_m, at_c = plan.at_step(0)[site.site_id].heads, plan.at_step(1)[site.site_id].heads
        want_m = model.finish(semantics.site_output(site, at_m, *m_qkv, site.scale), x0)[0]
        want_c = model.finish(semantics.site_output(site, at_c, *c_qkv, site.scale, renorm_from=m_qkv), x1)[0]
        dense_c = model(x1, *example[1:])[0]
    torch.testing.assert_close(got_m, want_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_c, want_c, rtol=1e-5, atol=1e-5)
    if remainder == "drop":
        torch.testing.assert_close(got_m, model(x0, *example[1:])[0], rtol=1e-5, atol=1e-5)   # measuring: exact
    plain = tuple(HeadPlan(**{**h.__dict__, "renorm": None, "remainder": "drop"}) for h in heads)
    plain_gm, _ = trace_and_rewrite(model, example, VsoptConfig(plan=Plan({site.site_id: SitePlan.for_site(
        site, plain)}), grid=grid))
    with torch.no_grad():
        sparse_c = plain_gm(x1, *example[1:])[0]
    assert (got_c - sparse_c).abs().max() > 1e-4                           # must NOT match plain sparse
    if kind == "window":
        assert (got_c - dense_c).norm() < (sparse_c - dense_c).norm()       # and it is closer to dense


def sample_with_the_sampler(renorm: Renorm, remainder: str, steps: int):
    """The planned model compiled with backend="vsopt" sampled twice (two clips), against the plan's
    meaning (at_step's phases with the measuring step's q/k/v), the dense model and the same plan
    without its correction: (plan, site, got, again, want, dense, sparse)."""
    grid = TokenGrid(2, 4, 6)
    model, example, site = _setup(grid, gain=1.0, seed=2)
    heads = HEADS_OF["window"](renorm, remainder)
    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    kept = {}

    def reference(x, t, c, return_dict=False):  # the meaning: at_step's phases, the measuring step's q/k/v
        step = current_denoising_step()
        qkv = model.qkv_heads(x)
        if measured_step(heads[0].renorm, step, 0) == step:
            kept["qkv"] = qkv
        out = semantics.site_output(site, plan.at_step(step)[site.site_id].heads, *qkv, site.scale,
                                    renorm_from=kept["qkv"])
        return model.finish(out, x)

    plain = Plan({site.site_id: SitePlan.for_site(site, tuple(HeadPlan(**{**h.__dict__, "renorm": None})
                                                               for h in heads))})
    shape = (C, grid.frames, grid.height, grid.width)
    RENORM_STATE.reset()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vsopt", options={"plan": plan, "grid": grid})
    with torch.no_grad():
        got = sampler.sample(compiled, example[2], shape, steps=steps, seed=3)
        again = sampler.sample(compiled, example[2], shape, steps=steps, seed=3)   # a new clip measures afresh
        want = sampler.sample(reference, example[2], shape, steps=steps, seed=3)
        dense = sampler.sample(model, example[2], shape, steps=steps, seed=3)
        torch._dynamo.reset()
        sparse = sampler.sample(torch.compile(model, backend="vsopt", options={"plan": plain, "grid": grid}),
                                example[2], shape, steps=steps, seed=3)
    set_denoising_step(None)
    return plan, site, got, again, want, dense, sparse


def sample_against_the_meaning(model, example, site, plan: Plan, grid: TokenGrid, steps: int):
    """The model compiled with backend="vsopt" and a plan of several heads, each with its own phases,
    sampled (seed 3) against the plan's meaning: at each step semantics.site_output of that step's
    heads, each head's statistics (or residual) from the q/k/v of its own measuring step. (got, want)."""
    shape = (C, grid.frames, grid.height, grid.width)
    kept = {}

    def reference(x, t, c, return_dict=False):
        step = current_denoising_step()
        qkv = model.qkv_heads(x)
        kept[step] = qkv
        heads = plan.at_step(step)[site.site_id].heads
        at = [measured_step(h.renorm, step, 0) if h.renorm is not None else step for h in heads]
        renorm_from = tuple(torch.cat([kept[a][i][:, h:h + 1] for h, a in enumerate(at)], dim=1) for i in range(3))
        return model.finish(semantics.site_output(site, heads, *qkv, site.scale, renorm_from=renorm_from), x)

    RENORM_STATE.reset()
    torch._dynamo.reset()
    with torch.no_grad():
        got = sampler.sample(torch.compile(model, backend="vsopt", options={"plan": plan, "grid": grid}),
                             example[2], shape, steps=steps, seed=3)
        want = sampler.sample(reference, example[2], shape, steps=steps, seed=3)
    set_denoising_step(None)
    return got, want


@pytest.mark.parametrize("every, steps", [(2, 5), (3, 7)])
def test_compiled_model_with_the_sampler_measures_and_corrects_at_the_planned_steps(every, steps):
    plan, site, got, again, want, dense, sparse = sample_with_the_sampler(Renorm(every=every), "drop", steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=1e-6, atol=1e-6)
    assert (got - sparse).abs().max() > 1e-5
    assert (got - dense).norm() < (sparse - dense).norm()
    assert [plan.at_step(s)[site.site_id].heads[0].renorm.phase is Phase.MEASURE for s in range(steps)] == \
        [s % every == 0 for s in range(steps)]


class Attn64(torch.nn.Module):
    """2 heads of 64 (a head dim the GPU kernel takes) over a 2x8x8 grid."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(128, 384)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 64)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["window", "topk"])
def test_renorm_under_cuda_graphs_on_the_gpu_replays_what_runs_without_them(kind):
    """Measuring and correcting graphs under CUDA graphs (warm-up, record, replay over three clips):
    no cudagraph skip (the statistics buffers are static inputs, written in place by the measuring
    graph's replay) and the outputs equal the same plan without CUDA graphs."""
    from torch._dynamo.utils import counters

    import vsopt

    grid = TokenGrid(2, 8, 8)
    torch.manual_seed(0)
    model = Attn64().cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, grid.num_tokens, 128, device="cuda", dtype=torch.bfloat16)
    _, report = trace_and_rewrite(model, (x,), VsoptConfig(grid=grid))
    (site,) = report.sites
    if kind == "window":
        heads = (HeadPlan(Sparsity.PATTERN, order="hwf", pattern=LocalWindow(0, 2, 2), block_m=32, block_n=32,
                          renorm=Renorm(2)),) * 2
    else:
        heads = (HeadPlan(Sparsity.DYNAMIC, dynamic=DynamicSpec(value=0.3), block_m=32, block_n=32,
                          renorm=Renorm(3)),) * 2
    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    inputs = [x + 0.05 * s * torch.randn_like(x) for s in range(6)]
    outs = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        RENORM_STATE.reset()
        skips = counters["inductor"]["cudagraph_skips"]
        compiled = torch.compile(model, backend="vsopt", options={"plan": plan, "grid": grid, "cudagraphs": graphs})
        with torch.no_grad():
            for clip in range(3):
                for step, xs in enumerate(inputs):
                    vsopt.set_denoising_step(step)
                    outs[graphs, clip, step] = compiled(xs).float().clone()
        vsopt.set_denoising_step(None)
        assert counters["inductor"]["cudagraph_skips"] == skips
    for step in range(6):
        for clip in range(3):
            torch.testing.assert_close(outs[True, clip, step], outs[False, clip, step], atol=2e-2, rtol=2e-2)
        assert torch.isfinite(outs[True, 2, step]).all()


def test_calibration_offers_renorm_candidates_and_the_compiled_model_runs_as_it_predicts():
    """calibrate() on recorded sampler steps with renorm_every (and pooled remainders) on offer:
    every sparse candidate also comes renormalized (measured exactly, or with the pooled remainder
    at the kept blocks' density), and under a density budget of 0.8 the search picks a renormalized one
    on this model; the plan runs, step by step through the compiled model and the sampler, what the
    plan means (semantics.site_output at each step's phases, statistics from the measuring step)."""
    from vsopt.calibration import CalibrationOptions, DensityBudget, calibrate
    from vsopt.calibration.capture import record_forward_inputs
    from vsopt.core.orders import TokenOrder
    from vsopt.core.plan import Quant

    from tests.core.test_calibrate_search import COST

    grid = TokenGrid(4, 4, 8)
    model, example, site = _setup(grid, gain=2.0, seed=4)
    steps = 5
    shape = (C, grid.frames, grid.height, grid.width)
    with torch.no_grad(), record_forward_inputs(model) as calls:
        sampler.sample(model, example[2], shape, steps=steps, seed=3)
    opts = CalibrationOptions(block_m=16, block_n=16, orders=(TokenOrder.FHW,), patterns=True, mass_shares=(0.5, 0.8),
                              dynamic_values=(), dynamic_top_k=(0.25,), renorm_every=(2,), pooled_remainder=True,
                              skip=False, quants=(Quant.NONE,), cost_model=COST)
    # 5 steps, measuring at 0, 2, 4: a renormalized candidate measured exactly computes 0.6 + 0.4 d
    result = calibrate(model, calls, DensityBudget(0.8), options=opts, grid=grid, progress=False)
    plan = result.plan
    chosen = [h for h in plan[site.site_id].all_heads()]
    assert any(h.renorm == Renorm(2) for h in chosen), chosen   # the search buys the correction here

    got, want = sample_against_the_meaning(model, example, site, plan, grid, steps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
