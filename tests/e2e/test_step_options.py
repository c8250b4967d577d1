"""Plan options over denoising steps through torch.compile(backend="vsopt") and the project's
sampler (vsopt.models.sampler.sample, which announces every step): a dense warm-up, and dynamic
masks reused between refresh steps (AdaSpa)."""
import pytest
import torch
import torch.nn.functional as F

import vsopt
import vsopt.core.dynamic as dynamic
from vsopt.backend import trace_and_rewrite
from vsopt.core import semantics
from vsopt.core.config import VsoptConfig
from vsopt.core.dynamic import DynamicMethod, DynamicSpec, current_denoising_step
from vsopt.core.ir import TokenGrid
from vsopt.core.patterns import LocalWindow
from vsopt.core.orders import TokenOrder
from vsopt.core.plan import HeadPlan, Plan, Quant, SitePlan, Sparsity
from vsopt.models import sampler

C, HEADS, D = 32, 2, 16


class ToyVideo(torch.nn.Module):
    """Wan's signature (latents (B, C, F, H, W), timestep, encoder_hidden_states): one
    self-attention over the video tokens, then a projection back to latents."""

    def __init__(self, gain: float = 0.1):
        super().__init__()
        self.gain = gain
        self.qkv = torch.nn.Linear(C, 3 * HEADS * D)
        self.out = torch.nn.Linear(HEADS * D, C)

    def qkv_heads(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C), frames-height-width order
        return self.qkv(tokens).unflatten(-1, (3, HEADS, D)).permute(2, 0, 3, 1, 4)

    def finish(self, o, x):
        return (self.gain * self.out(o.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(x.shape),)

    def forward(self, x, timestep, encoder_hidden_states, return_dict=False):
        q, k, v = self.qkv_heads(x)
        return self.finish(F.scaled_dot_product_attention(q, k, v), x)


def _setup(grid, seed=0, gain=0.1):
    torch.manual_seed(seed)
    model = ToyVideo(gain).eval()
    example = (torch.randn(1, C, grid.frames, grid.height, grid.width), torch.tensor([500.0]), torch.randn(1, 3, 8))
    _, report = trace_and_rewrite(model, example, VsoptConfig(grid=grid))
    (site,) = report.sites
    return model, example, site


def _compiled(model, plan, grid):
    torch._dynamo.reset()
    return torch.compile(model, backend="vsopt", options={"plan": plan, "grid": grid})


def _sample(model, example, grid, steps):
    return sampler.sample(model, example[2], (C, grid.frames, grid.height, grid.width), steps=steps, seed=3)


@pytest.mark.parametrize("grid, warm", [(TokenGrid(2, 4, 4), 2), (TokenGrid(3, 3, 5), 1)])
def test_dense_warmup_through_the_compiled_model_and_the_sampler(grid, warm):
    model, example, site = _setup(grid)
    window = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(0, 1, 1), block_m=16, block_n=16)
    sparse = Plan({site.site_id: SitePlan.for_site(site, window)})
    plan = sparse.with_dense_warmup(warm)
    sparse_gm, _ = trace_and_rewrite(model, example, VsoptConfig(plan=sparse, grid=grid))

    def reference(x, t, c, return_dict=False):  # the meaning: dense before `warm`, the window after
        return model(x, t, c) if current_denoising_step() < warm else sparse_gm(x, t, c)

    steps = 4
    with torch.no_grad():
        got = _sample(_compiled(model, plan, grid), example, grid, steps)
        want = _sample(reference, example, grid, steps)
        no_warmup = _sample(_compiled(model, sparse, grid), example, grid, steps)
        dense = _sample(model, example, grid, steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the warm-up changes the clip, and brings it closer to the dense one
    assert (got - no_warmup).abs().max() > 1e-4
    assert (got - dense).norm() < (no_warmup - dense).norm()


@pytest.mark.parametrize("grid, refresh, steps", [(TokenGrid(4, 4, 8), 2, 5), (TokenGrid(3, 6, 6), 3, 7)])
def test_reused_dynamic_masks_refresh_exactly_at_the_refresh_steps(grid, refresh, steps, monkeypatch):
    model, example, site = _setup(grid, seed=1, gain=20.0)  # a large velocity: the masks move between steps
    spec = DynamicSpec(DynamicMethod.TOP_K, 0.4, reuse_steps=refresh - 1)
    heads = (HeadPlan(Sparsity.DYNAMIC, dynamic=spec, block_m=16, block_n=16),) * HEADS
    plan = Plan({site.site_id: SitePlan.for_site(site, heads)})
    computed = []
    real_predict = dynamic.predicted_block_mask

    def counting(*args, **kwargs):  # the op's mask prediction, as the compiled model runs it
        computed.append(current_denoising_step())
        return real_predict(*args, **kwargs)

    kept = {}

    def reference(x, t, c, return_dict=False):  # the meaning: semantics.mask_refresh_step + site_output
        step = current_denoising_step()
        q, k, v = model.qkv_heads(x)
        if semantics.mask_refresh_step(spec, step) == step:
            kept["qk"] = (q, k)
        out = semantics.site_output(site, heads, q, k, v, site.scale, masks_from=kept["qk"])
        return model.finish(out, x)

    def fresh(x, t, c, return_dict=False):  # masks recomputed at every step (no reuse)
        q, k, v = model.qkv_heads(x)
        return model.finish(semantics.site_output(site, heads, q, k, v, site.scale), x)

    dynamic.MASK_CACHE.reset()
    with torch.no_grad():
        compiled = _compiled(model, plan, grid)
        monkeypatch.setattr(dynamic, "predicted_block_mask", counting)
        got = _sample(compiled, example, grid, steps)
        first = list(computed)
        again = _sample(compiled, example, grid, steps)  # a second clip: step 0 computes afresh
        monkeypatch.setattr(dynamic, "predicted_block_mask", real_predict)
        want = _sample(reference, example, grid, steps)
        every_step = _sample(fresh, example, grid, steps)
    assert first == list(range(0, steps, refresh))
    assert computed == first + first
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=1e-6, atol=1e-6)
    assert (got - every_step).abs().max() > 1e-5  # the reused masks do differ from fresh ones


def test_mask_refresh_step():
    spec = DynamicSpec(DynamicMethod.TOP_K, 0.3, reuse_steps=2)
    assert [semantics.mask_refresh_step(spec, s) for s in range(7)] == [0, 0, 0, 3, 3, 3, 6]
    assert [semantics.mask_refresh_step(spec, s, 4) for s in range(4, 9)] == [4, 4, 4, 7, 7]
    assert semantics.mask_refresh_step(DynamicSpec(), 5) == 5
    with pytest.raises(vsopt.core.errors.ConfigError, match="before its segment"):
        semantics.mask_refresh_step(spec, 1, 2)


def _recorded(model, example, grid, steps):
    from vsopt.calibration.capture import record_forward_inputs

    with record_forward_inputs(model) as calls:
        _sample(model, example, grid, steps)
    return calls


def test_calibration_with_warmup_and_refresh_candidates_runs_as_it_predicts():
    """calibrate() on recorded sampler steps with dense warm-ups and mask refresh intervals on
    offer: the plan says which it chose, and the compiled model under the sampler computes, step by
    step, what the calibration's check predicted (the meaning of the plan: semantics.site_output at
    the step's heads, reused masks from their refresh step)."""
    from vsopt.calibration import CalibrationOptions, DensityBudget, calibrate

    from tests.core.test_calibrate_search import COST

    grid = TokenGrid(4, 4, 8)
    model, example, site = _setup(grid, seed=2, gain=5.0)
    steps = 5
    calls = _recorded(model, example, grid, steps)
    ranges = ((0, 1), (1, None))
    opts = CalibrationOptions(block_m=16, block_n=16, orders=(TokenOrder.FHW,), patterns=False, mass_shares=(0.9,),
                              dynamic_values=(), dynamic_top_k=(0.25, 0.5), mask_refresh=(2,), dense_warmup=(1,),
                              step_ranges=ranges, skip=False, quants=(Quant.NONE,), cost_model=COST)
    result = calibrate(model, calls, DensityBudget(0.6), options=opts, grid=grid, progress=False)
    plan = result.plan
    record = plan.meta["calibration"]["dense_warmup"]
    assert record["chosen"] in (0, 1) and set(record["tried"]) == {"0", "1"}
    # the plan runs at least the chosen warm-up dense; the search under k = 0 may itself keep the
    # whole first range dense (the density search's greedy finish can spend its blocks there)
    assert plan.dense_warmup >= record["chosen"]
    late = plan[site.site_id].heads_at(1)
    offered = [c for r in result.sites if r.steps == (1, None) for c in r.choices]
    assert offered  # the late range's choices are recorded

    # the compiled model under the sampler, against the meaning computed per step
    kept = {}

    def reference(x, t, c, return_dict=False):
        step = current_denoising_step()
        heads = plan[site.site_id].heads_at(step)
        start = plan.segment_start(step)
        q, k, v = model.qkv_heads(x)
        kept[step] = (q, k)
        # each dynamic head's mask from its refresh step: per head, that step's q and k
        at = [semantics.mask_refresh_step(h.dynamic, step, start) if h.sparsity is Sparsity.DYNAMIC else step
              for h in heads]
        masks_from = tuple(torch.cat([kept[a][i][:, h:h + 1] for h, a in enumerate(at)], dim=1) for i in (0, 1))
        if all(h.sparsity is Sparsity.DENSE for h in heads):
            return model(x, t, c)
        return model.finish(semantics.site_output(site, heads, q, k, v, site.scale, masks_from=masks_from), x)

    dynamic.MASK_CACHE.reset()
    with torch.no_grad():
        got = _sample(_compiled(model, plan, grid), example, grid, steps)
        want = _sample(reference, example, grid, steps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert any(h.sparsity is not Sparsity.DENSE for h in late)
