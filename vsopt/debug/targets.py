"""Ready-made targets for `vsopt diff MODULE:FACTORY`: each factory returns (model, example_inputs,
sampler), the form any user factory may take (the sampler is optional; see vsopt.debug.build).

    vsopt diff vsopt.debug.targets:reference          the shipped reference model (a trained
                                                      diffusers Wan), one denoising step's inputs
    vsopt diff vsopt.debug.targets:wan_tiny           a tiny random diffusers WanTransformer3DModel

The sampler runs the reference Euler sampler (vsopt.models.sampler) with the denoiser it is given,
so `--steps` shows the error over the sampling trajectory.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_leaves

from vsopt.core.errors import ConfigError

DESCRIPTION = "checker background; red circle moving right, clockwise, growing"
SAMPLER_STEPS = 4  # few: every optimized step runs the model three times (dense, isolated, accumulated)


def euler_sampler(cond: torch.Tensor, shape: tuple[int, int, int, int], steps: int = SAMPLER_STEPS,
                  seed: int = 0) -> Callable[[Callable[..., Any]], list[torch.Tensor]]:
    """A sampler for vsopt.debug.numeric.measure_trajectory: the reference Euler sampler from seeded
    noise, calling denoise(latents, timestep, cond) once per step; returns the latents after each
    step. shape: (C, F, H, W) of one latent clip; cond: (1, L, D) encoder_hidden_states."""
    from vsopt.models.sampler import sample

    def run(denoise: Callable[..., Any]) -> list[torch.Tensor]:
        inputs: list[torch.Tensor] = []

        def model(x, t, c, return_dict=False):
            inputs.append(x.detach().float().clone())
            (velocity,) = tree_leaves(denoise(x, t, c))  # a graph's output may be flat or Wan's output class
            return (velocity,)

        final = sample(model, cond, shape, steps=steps, seed=seed)
        return inputs[1:] + [final]  # the state after step i is the input of step i + 1

    return run


def _step_inputs(shape: tuple[int, int, int, int], cond: torch.Tensor, sigma: float = 0.5,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, timestep, cond) of one mid-trajectory denoising step, from seeded noise."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, *shape), generator=g)
    return latents, torch.tensor([1000.0 * sigma]), cond


def reference(frames: int | None = None, height: int | None = None, width: int | None = None,
              seed: int = 0) -> tuple[torch.nn.Module, Sequence[Any], Callable]:
    """The shipped reference model's transformer, float32 on CPU, at its trained clip size (or a
    smaller one: the model takes any size its patching divides), conditioned on DESCRIPTION."""
    from vsopt.models import data
    from vsopt.models.model import load_shipped

    try:
        ref = load_shipped()
    except FileNotFoundError as e:
        raise ConfigError(f"the reference model is not available: {e}") from None
    cond = ref.encode(data.tokenize(DESCRIPTION)[None])
    return _wan_target(ref.transformer, cond, (data.CHANNELS, frames or ref.config.frames, height or ref.config.height,
                        width or ref.config.width), seed)


def wan_tiny(seed: int = 0) -> tuple[torch.nn.Module, Sequence[Any], Callable]:
    """A tiny diffusers WanTransformer3DModel (random weights, 2 layers, 2 heads): the real Wan
    code, small enough for a quick look (the numbers mean little: random attention is flat)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                      in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                      num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
        cond = torch.randn(1, 6, 32)
    return _wan_target(model.eval(), cond, (4, 3, 6, 6), seed)


def _wan_target(model: torch.nn.Module, cond: torch.Tensor, shape: tuple[int, int, int, int], seed: int):
    cond = cond.detach().float()
    return model, _step_inputs(shape, cond, seed=seed), euler_sampler(cond, shape, seed=seed)
