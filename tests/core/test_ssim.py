"""SSIM against a direct per-window computation in float64."""
import math

import pytest
import torch

from vsopt.core.metrics import _gaussian_window, ssim


def _ssim_by_windows(x: torch.Tensor, y: torch.Tensor, data_range: float, size: int = 7, sigma: float = 1.5) -> float:
    w = _gaussian_window(size, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for img_x, img_y in zip(x.reshape(-1, *x.shape[-2:]).double(), y.reshape(-1, *y.shape[-2:]).double()):
        H, W = img_x.shape
        for i in range(H - size + 1):
            for j in range(W - size + 1):
                a, b = img_x[i:i + size, j:j + size], img_y[i:i + size, j:j + size]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(torch.stack(vals).mean())


@pytest.mark.parametrize("shape", [(7, 7), (2, 9, 11), (3, 2, 8, 13)])
def test_ssim_matches_window_by_window(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.rand(shape, generator=g)
    y = (x + 0.2 * torch.randn(shape, generator=g)).clamp(0, 1)
    assert math.isclose(ssim(x, y, 1.0), _ssim_by_windows(x, y, 1.0), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(ssim(x, y, 1.0), ssim(y, x, 1.0), rel_tol=1e-12)


def test_ssim_identity_and_ordering():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 16, 16, generator=g)
    noise = torch.randn(4, 16, 16, generator=g)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x + 0.05 * noise, x) > ssim(x + 0.3 * noise, x)


def test_ssim_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(torch.zeros(8, 8), torch.zeros(8, 9))
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(torch.zeros(5, 5), torch.zeros(5, 5))
    with pytest.raises(ValueError, match="data_range"):
        ssim(torch.zeros(8, 8), torch.zeros(8, 8), data_range=0)
