"""SSIM of videos (PSNR lives in vsopt.core.metrics).

SSIM (Wang et al. 2004) with a Gaussian window (size 7, sigma 1.5: the frames are small, 32x32),
constants K1 = 0.01, K2 = 0.03, computed per frame and channel on the "valid" part of the image
(no padding) and averaged, in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size), sums to 1


def ssim(actual: torch.Tensor, expected: torch.Tensor, data_range: float = 1.0, window: int = 7,
         sigma: float = 1.5) -> float:
    """Mean SSIM of two videos or images of the same shape (..., H, W); every leading index is
    a separate frame/channel image. H and W must be >= window. 1.0 means identical."""
    if actual.shape != expected.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if actual.dim() < 2 or min(actual.shape[-2:]) < window:
        raise ValueError(f"ssim: images must be at least {window}x{window}, got shape {tuple(actual.shape)}")
    if data_range <= 0:
        raise ValueError(f"ssim: data_range must be > 0, got {data_range}")
    h, w = actual.shape[-2:]
    x = actual.detach().double().reshape(-1, 1, h, w)
    y = expected.detach().double().reshape(-1, 1, h, w)
    kernel = _gaussian_window(window, sigma).to(x.device)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)  # local weighted mean over each window position

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return float(s.mean())
