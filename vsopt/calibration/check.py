"""Checking a written plan by running the model with it: one input dense, as the plan-lowered
graph (eagerly) and through torch.compile (check_plan), or a whole sampler run of the shipped
reference model (reference_sampler_check)."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

from vsopt.backend import trace_and_rewrite
from vsopt.calibration.capture import RecordedCall
from vsopt.calibration.inputs import model_output, positional, reference_conditioning, reference_model_inputs
from vsopt.core.config import VsoptConfig
from vsopt.core.ir import TokenGrid
from vsopt.core.metrics import psnr, relative_l2
from vsopt.core.plan import Plan
from vsopt.core.timing import interleaved_ms, median_ms


def check_plan(model: torch.nn.Module, call: RecordedCall, plan_path: str | os.PathLike,
               grid: TokenGrid | None = None, repeats: int = 10, compile: bool = True,
               cudagraphs: bool = False) -> dict[str, Any]:
    """Run `model` on one input dense, as the plan-lowered graph run eagerly (the kernels called
    directly), and through torch.compile(backend="vsopt") with the plan (Inductor).

    Returns, for "lowered" and "compiled": relative L2 and PSNR of the model output against the
    dense model, and on CUDA the median milliseconds per call: dense eager and lowered eager, and
    compiled three ways, timed in turn (compiled_timing says how): torch.compile's default
    (dense_compiled_ms), backend="vsopt" without a plan (noplan_compiled_ms: the same graph an
    all-dense plan compiles to) and with the plan (compiled_ms). The compiled calls run at the
    call's denoising step (the plan's step-range variant a sampler runs there), each warmed up
    (compiling, autotuning, building that variant) before any is timed, and the three are timed
    interleaved (vsopt.core.timing.interleaved_ms), so that a drift of a host-bound machine does
    not fall on whichever is timed last. cudagraphs: compiled under CUDA graphs (Inductor's
    mode="reduce-overhead", vsopt's option), as a plan priced for them runs. A torch.compile failure
    is returned as "compiled_error" (its first line), not raised: the lowered numbers still stand.
    compile=False skips torch.compile."""
    from vsopt.core.dynamic import current_denoising_step, set_denoising_step

    signature, (inputs,) = positional(model, [call])
    config = VsoptConfig(plan=Plan.load(plan_path), grid=grid)
    on_gpu = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    check: dict[str, Any] = {}
    with torch.no_grad():
        with signature.bound(model):
            lowered, _ = trace_and_rewrite(model, inputs, config)
        dense_out = model_output(model(*call.args, **call.kwargs)).float()
        out = model_output(lowered(*inputs)).float()
        check.update(lowered_rel_l2=relative_l2(out, dense_out), lowered_psnr_db=psnr(out, dense_out))
        if on_gpu:
            check["dense_eager_ms"] = median_ms(lambda: model(*call.args, **call.kwargs), repeats)
            check["lowered_eager_ms"] = median_ms(lambda: lowered(*inputs), repeats)
        if not compile:
            return check
        options: dict[str, Any] = {"grid": grid} if grid is not None else {}
        if cudagraphs:
            options["cudagraphs"] = True
        step = current_denoising_step()
        set_denoising_step(call.step)
        try:
            compiled = torch.compile(model, backend="vsopt", options={**options, "plan": os.fspath(plan_path)})
            out = model_output(_warm(compiled, call)).float()
            check.update(compiled_rel_l2=relative_l2(out, dense_out), compiled_psnr_db=psnr(out, dense_out))
            if on_gpu:
                baseline = torch.compile(model, **({"mode": "reduce-overhead"} if cudagraphs else {}))
                noplan = torch.compile(model, backend="vsopt", options=options)
                fns = {"dense_compiled_ms": baseline, "noplan_compiled_ms": noplan, "compiled_ms": compiled}
                for fn in (baseline, noplan):
                    _warm(fn, call)
                rounds = max(1, repeats // 2)
                times = interleaved_ms({k: (lambda f=f: f(*call.args, **call.kwargs)) for k, f in fns.items()},
                                       rounds=rounds, iters=2)
                check.update({k: statistics.median(v) for k, v in times.items()})
                check["compiled_timing"] = (f"step {call.step}, {'CUDA graphs, ' if cudagraphs else ''}"
                                            f"{rounds} interleaved rounds of 2 calls each, medians")
        except Exception as e:  # noqa: BLE001 - reported, the lowered numbers still stand
            check["compiled_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        finally:
            set_denoising_step(step)
    return check


def _warm(compiled, call: RecordedCall, calls: int = 3):
    """Call `compiled` on `call` a few times (compile, autotune, CUDA-graph warm-up and recording);
    the last output."""
    for _ in range(calls):
        out = compiled(*call.args, **call.kwargs)
    return out


def reference_sampler_check(ref, plan_path: str | os.PathLike, *, clips: int = 2, steps: int = 8,
                            seed: int = 1, guidance: float = 1.0) -> dict[str, float]:
    """Sample `clips` held-out clips (seed `seed`, not the calibration seed) with the reference model
    dense and with the plan-lowered graph (run eagerly), `steps` steps at classifier-free guidance
    `guidance` (as `vsopt demo` samples: 3; guidance multiplies the plan's error in the conditional
    branch); PSNR and relative L2 of the final latents, and on CUDA the seconds of each sampling
    run. The whole trajectory counts: errors compound."""
    from vsopt.models import sampler

    device = next(ref.transformer.parameters()).device
    cond, uncond, shape = reference_conditioning(ref, clips, seed, guidance)
    # traced at the batch the sampler calls with (cond and uncond together under guidance)
    probe = reference_model_inputs(ref, clips=clips, steps=1, seed=seed, guidance=guidance)[0]
    signature, (inputs,) = positional(ref.transformer, [probe])
    with signature.bound(ref.transformer):
        lowered, _ = trace_and_rewrite(ref.transformer, inputs, VsoptConfig(plan=Plan.load(plan_path)))

    def run(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = sampler.sample(fn, cond, shape, steps=steps, seed=seed, guidance=guidance, uncond=uncond)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    dense, dense_s = run(ref.transformer)
    planned, planned_s = run(lambda x, t, c, return_dict=False: lowered(x, t, c))
    result = {"sampler_psnr_db": psnr(planned, dense), "sampler_rel_l2": relative_l2(planned, dense)}
    if device.type == "cuda":
        result.update(sampler_dense_s=dense_s, sampler_lowered_s=planned_s)
    return result
