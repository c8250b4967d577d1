"""How much a sampler's final output moves when one attention site errs at one denoising step.

A site's relative error does not cost the same everywhere: on the shipped reference model, the
same kind of sparsity error in the first layer or at the first steps lowers the final PSNR by far
more than in a middle layer or at the last step (errors made early are carried, and amplified,
by every later step). The density search (vsopt.calibration.search.search_density) weighs each site's
predicted squared error by this sensitivity when it is given one (`CalibrationOptions.
error_weights`), so that blocks go where they protect the final output most.

    weights = euler_sensitivity(gm, velocity, step_inputs, sigmas, site_ids, probe)
    # weights[site_id][step] = (final relative error)^2 / (site relative error)^2

Measurement, per step i and site s (one model run with s perturbed, then the dense model to the
end): the site's output at step i is replaced by `probe(call)` (e.g. the site under a top-k
sparse mask: an error of the kind a plan makes), the step is taken, and the remaining steps run
dense from the recorded inputs (only the latents change); the final latents' squared relative
error against the dense trajectory's, divided by the probe's squared relative error at the
site, is the weight. Errors are assumed small and independent, so a plan's predicted final
error^2 is the weighted sum of its sites' error^2 over sites and steps.

Sampler convention (vsopt.models.sampler, Wan, rectified flow): the model's first input is the
latents x, and x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i, with `sigmas` the steps + 1 noise
levels. With classifier-free guidance g != 1 the model's batch is [x, x] (cond then uncond: the
sampler's), its output (v_c, v_u), and v = v_u + g * (v_c - v_u): one trajectory, not two. Cost: one observed run plus (steps - 1 - i) dense runs per site and step i, the dense
continuations batched over sites.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from vsopt.calibration.capture import SiteCall, run_observing
from vsopt.calibration.inputs import model_output
from vsopt.core.errors import ConfigError


def euler_sensitivity(gm: torch.fx.GraphModule, velocity: Callable[..., torch.Tensor],
                      step_inputs: Sequence[tuple], sigmas: torch.Tensor, site_ids: Sequence[str],
                      probe: Callable[[SiteCall], torch.Tensor], guidance: float = 1.0) -> dict[str, dict[int, float]]:
    """Sensitivity of the final latents to each of `site_ids`' error at each step.

    gm: the model traced and rewritten by vsopt.backend.trace_and_rewrite (sites observable).
    velocity(*inputs) -> v: the dense model, any batch size (it runs the continuations).
    step_inputs: the positional inputs of each step of one dense sampler run, the latents first,
      every tensor input batch-first. sigmas: (steps + 1,) noise levels of that run.
    probe(call) -> the site's perturbed output (same shape as call.out).
    guidance: the sampler's classifier-free guidance scale (the inputs' batch is then [x, x]).
    Returns site_id -> {step: (final rel. error)^2 / (site rel. error)^2}."""
    steps, site_ids = len(step_inputs), list(site_ids)
    if len(sigmas) != steps + 1:
        raise ConfigError(f"euler_sensitivity: {steps} steps need {steps + 1} sigmas, got {len(sigmas)}")
    guided = guidance != 1.0

    def latents(inp: tuple) -> torch.Tensor:
        return inp[0].chunk(2)[0].float() if guided else inp[0].float()

    def step_velocity(out) -> torch.Tensor:   # the model's output for one trajectory -> its v
        v = model_output(out).float()
        if not guided:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    last = step_inputs[-1]
    final = (latents(last) + float(sigmas[-1] - sigmas[-2]) * step_velocity(velocity(*last))).double()
    final_norm2 = max(float(final.pow(2).sum()), 1e-300)
    weights: dict[str, dict[int, float]] = {sid: {} for sid in site_ids}
    for i, inp in enumerate(step_inputs):
        site_err2, xs = {}, []
        for sid in site_ids:
            def observe(call: SiteCall, sid=sid):
                if call.site_id != sid:
                    return None
                out, ref = probe(call), call.out.double()
                site_err2[sid] = float((out.double() - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300))
                return out

            v = step_velocity(run_observing(gm, inp, observe))
            if sid not in site_err2:
                raise ConfigError(f"euler_sensitivity: site {sid!r} did not run at step {i}")
            xs.append(latents(inp) + float(sigmas[i + 1] - sigmas[i]) * v)
        # the remaining steps dense, all perturbed trajectories in one batch ([x_s, x_s] each, guided)
        n = len(site_ids)
        for j in range(i + 1, steps):
            x_in = torch.cat([torch.cat([x, x]) if guided else x for x in xs])
            rest = [a.repeat(n, *[1] * (a.dim() - 1)) if isinstance(a, torch.Tensor) and a.dim() > 0 else a
                    for a in step_inputs[j][1:]]
            out = model_output(velocity(x_in.to(step_inputs[j][0].dtype), *rest)).float()
            xs = [x + float(sigmas[j + 1] - sigmas[j]) * step_velocity(o) for x, o in zip(xs, out.chunk(n))]
        for sid, xb in zip(site_ids, xs):
            final_err2 = float((xb.double() - final).pow(2).sum()) / final_norm2
            weights[sid][i] = final_err2 / max(site_err2[sid], 1e-300)
    return weights


def sensitivity_probe(block: int, density: float = 0.5, pooled: bool = False):
    """The head sampler_sensitivity puts on every head of the site it probes: block top-k at
    `density` of key blocks per query row, block x block, in the model's order (an error of the
    kind sparse attention makes); `pooled`: its dropped key blocks attended mean-pooled (PSA), the
    error kind plans with the pooled remainder make. sampler_sensitivity's default is top-k 0.5;
    `vsopt calibrate --sensitivity-probe pooled` and the bench's --vsopt-probe take the pooled
    one at the calibration's lowest density."""
    from vsopt.core.dynamic import DynamicMethod, DynamicSpec
    from vsopt.core.plan import HeadPlan, Sparsity

    return HeadPlan(Sparsity.DYNAMIC, block_m=block, block_n=block, remainder="pooled" if pooled else "drop",
                    dynamic=DynamicSpec(DynamicMethod.TOP_K, density))


def probe_text(head=None) -> str:
    """A probe head as CalibrationOptions.error_weights_probe records it ("top-k 0.5", "pooled
    top-k 0.3"); None: sampler_sensitivity's default."""
    from vsopt.core.plan import Remainder

    head = head or sensitivity_probe(64)
    pooled = "pooled " if head.remainder is Remainder.POOLED else ""
    return f"{pooled}top-k {head.dynamic.value:g}"


def sampler_sensitivity(model: torch.nn.Module, calls: Sequence, block: int, probe_head=None,
                        guidance: float = 1.0, grid=None) -> dict[str, dict[int, float]]:
    """euler_sensitivity of `model` on `calls`, the recorded inputs of one dense run of
    vsopt.models.sampler (one per step, in order; RecordedCalls or positional tuples), for each
    site calibrate weighs (vsopt.calibration.measure.calibratable: the same tracing, so the same
    site ids), each probed on every head with `probe_head` (None: sensitivity_probe(block), block
    top-k at density 0.5, block x block, in the model's order).
    Shared by `vsopt calibrate --sensitivity` and the bench. Returns euler_sensitivity's weights."""
    from vsopt.backend import trace_and_rewrite
    from vsopt.calibration.inputs import as_recorded, positional
    from vsopt.calibration.measure import calibratable
    from vsopt.core import semantics
    from vsopt.core.config import VsoptConfig
    from vsopt.models import sampler

    signature, inputs = positional(model, [as_recorded(c, i) for i, c in enumerate(calls)])
    head = probe_head if probe_head is not None else sensitivity_probe(block)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), signature.bound(model):
            gm, report = trace_and_rewrite(model, inputs[0], VsoptConfig(grid=grid))
            sites = {s.site_id: s for s in report.sites if calibratable(s) is None}

            def probe(call: SiteCall) -> torch.Tensor:
                return semantics.site_output(sites[call.site_id], [head] * call.q.shape[1], call.q, call.k, call.v,
                                             call.scale, softcap=call.softcap)

            return euler_sensitivity(gm, model, inputs, sampler.sigmas(len(inputs)), list(sites), probe, guidance)
    finally:
        model.train(was_training)
