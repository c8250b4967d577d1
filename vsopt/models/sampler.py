"""Euler sampling of a rectified-flow (flow-matching) video model, as Wan samples.

Convention (Wan / rectified flow): x_sigma = (1 - sigma) * x0 + sigma * noise, sigma in [0, 1],
and the model predicts the velocity v = noise - x0, taking timestep = 1000 * sigma. Sampling walks
sigma from 1 to 0 on a fixed, shifted grid, sigma' = shift * s / (1 + (shift - 1) * s) for s evenly
spaced in [1, 0] (shift > 1 spends more steps at high noise, as Wan's sampler does), with Euler
steps x <- x + (sigma_next - sigma) * v.

Works with any callable of Wan's forward signature,
    model(latents (B, C, F, H, W), timestep (B,), encoder_hidden_states (B, L, D), return_dict=False)
        -> (velocity (B, C, F, H, W),)
so a torch.compile'd model samples the same way.
"""
from __future__ import annotations

from typing import Callable

import torch


def sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The steps + 1 noise levels, float64, from 1 down to 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise (float32, CPU) from `seed`: the same on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)


@torch.no_grad()
def sample(model: Callable[..., tuple[torch.Tensor, ...]], cond: torch.Tensor, shape: tuple[int, int, int, int],
           *, steps: int = 20, seed: int = 0, guidance: float = 1.0, uncond: torch.Tensor | None = None,
           shift: float = 3.0, noise: torch.Tensor | None = None, progress: bool | str = False,
           callback: Callable[[int, float], None] | None = None) -> torch.Tensor:
    """Turn noise and a description into clips.

    model: Wan-signature callable (see module doc), already on its device and dtype.
    cond: encoder_hidden_states (B, L, D) of the descriptions, on the model's device and dtype.
    shape: (C, F, H, W) of one latent clip. guidance: classifier-free guidance scale; 1 means none
    (one forward per step); otherwise `uncond` (B or 1, L, D), the empty description, is required
    and each step runs cond and uncond in one batch: v = v_u + guidance * (v_c - v_u).
    noise: optional starting noise (B, C, F, H, W); by default initial_noise(seed).
    progress: show a progress bar of the steps (a string: the bar's label).
    callback(step, sigma) runs before each step (e.g. to capture attention at chosen steps).
    Returns float32 latents (B, C, F, H, W) on the model's device.
    """
    if cond.dim() != 3:
        raise ValueError(f"cond must be (B, L, D) encoder_hidden_states, got shape {tuple(cond.shape)}")
    B = cond.shape[0]
    if guidance != 1.0:
        if uncond is None:
            raise ValueError("classifier-free guidance (guidance != 1) needs `uncond`, the empty description's embedding")
        uncond = uncond.expand(B, -1, -1)
        cond_in = torch.cat([cond, uncond], dim=0)
    else:
        cond_in = cond
    x = initial_noise((B, *shape), seed) if noise is None else noise.float().cpu()
    if x.shape != (B, *shape):
        raise ValueError(f"noise has shape {tuple(x.shape)}, expected {(B, *shape)}")
    x = x.to(cond.device)
    dtype = cond.dtype
    levels = sigmas(steps, shift)
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=progress if isinstance(progress, str) else "sampling", unit="step", leave=False)
    from vsopt.core.dynamic import set_denoising_step

    try:
        for i in iterator:
            sigma, sigma_next = float(levels[i]), float(levels[i + 1])
            if callback is not None:
                callback(i, sigma)
            set_denoising_step(i)  # a plan's step ranges and dynamic-mask reuse follow the sampler
            x_in = torch.cat([x, x], dim=0) if guidance != 1.0 else x
            t = torch.full((x_in.shape[0],), 1000.0 * sigma, device=x.device, dtype=torch.float32)
            v = model(x_in.to(dtype), t, cond_in, return_dict=False)[0].float()
            if guidance != 1.0:
                v_cond, v_uncond = v.chunk(2, dim=0)
                v = v_uncond + guidance * (v_cond - v_uncond)
            x = x + (sigma_next - sigma) * v
    finally:
        set_denoising_step(None)
    return x
