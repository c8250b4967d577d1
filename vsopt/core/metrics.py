"""Accuracy and attention-structure metrics shared by calibration, demo, diff and bench."""
from __future__ import annotations

import math

import torch


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int = 64, block_n: int = 64,
                         query_chunk: int = 1024, softcap: float = 0.0) -> torch.Tensor:
    """Exact block-level attention mass, without materializing the N x N map at once.

    q: (B, H, Nq, D); k: (B, Hkv, Nk, D) (Hkv divides H). Returns float32 (B, H, QB, KB) with
    QB = ceil(Nq / block_m), KB = ceil(Nk / block_n): entry [b, h, i, j] is the softmax
    probability mass that the queries of block i give to the keys of block j, averaged over the
    queries of block i (so each row sums to 1). Computed in float32, `query_chunk` query rows at a
    time (memory O(query_chunk * Nk) per head). softcap > 0: the scores are capped first,
    s -> softcap * tanh(s / softcap), as the site computes them.
    """
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads {H} not a multiple of key heads {Hkv}")
    k = k.repeat_interleave(H // Hkv, dim=1) if Hkv != H else k
    QB, KB = math.ceil(Nq / block_m), math.ceil(Nk / block_n)
    query_chunk = max(block_m, query_chunk // block_m * block_m)  # chunks hold whole query blocks
    kf = k.float()
    # key index -> key block, as a one-hot (Nk, KB) summing matrix
    key_block = torch.arange(Nk, device=q.device) // block_n
    to_blocks = torch.zeros(Nk, KB, device=q.device, dtype=torch.float32)
    to_blocks[torch.arange(Nk, device=q.device), key_block] = 1.0
    out = torch.zeros(B, H, QB, KB, device=q.device, dtype=torch.float32)
    for start in range(0, Nq, query_chunk):
        stop = min(Nq, start + query_chunk)
        s = q[:, :, start:stop].float() @ kf.transpose(-1, -2) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        p = torch.softmax(s, dim=-1)  # (B, H, c, Nk)
        mass = p @ to_blocks  # (B, H, c, KB)
        qb = torch.arange(start, stop, device=q.device) // block_m
        out.index_add_(2, qb, mass)
    rows = torch.bincount(torch.arange(Nq, device=q.device) // block_m, minlength=QB).float()
    return out / rows[None, None, :, None]


def topk_block_share(mass: torch.Tensor, fraction: float) -> torch.Tensor:
    """Share of attention mass held by the top `fraction` of blocks of each head.

    mass: (B, H, QB, KB) from block_attention_mass. Returns (B, H): for each head, the sum of its
    largest ceil(fraction * QB * KB) block masses divided by the total (QB, since rows sum to 1)."""
    flat = mass.flatten(2)
    k = max(1, math.ceil(fraction * flat.shape[-1]))
    return flat.topk(k, dim=-1).values.sum(-1) / flat.sum(-1)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors taken as flat vectors, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def psnr(actual: torch.Tensor, expected: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; data_range defaults to expected's max - min."""
    a, e = actual.double(), expected.double()
    rng = float(e.max() - e.min()) if data_range is None else data_range
    mse = float(((a - e) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(rng * rng / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """(size, size) float64 Gaussian weights summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(actual: torch.Tensor, expected: torch.Tensor, data_range: float | None = None, window: int = 7,
         sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of two tensors of the same shape (..., H, W).

    Every leading index is a separate image (e.g. a video (B, C, F, H, W) gives B*C*F frames),
    compared with a Gaussian window (size `window`, std `sigma`: 7 and 1.5 suit small frames) on
    the valid part of the image (no padding), constants K1 = 0.01, K2 = 0.03, in float64.
    data_range: the value range (1.0 for images in [0, 1]); None takes expected's max - min.
    H and W must be >= window. Returns the mean SSIM; 1.0 means identical."""
    if actual.shape != expected.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if actual.dim() < 2 or min(actual.shape[-2:]) < window:
        raise ValueError(f"ssim: images must be at least {window}x{window}, got shape {tuple(actual.shape)}")
    if data_range is None:
        data_range = float(expected.max() - expected.min()) or 1.0
    if data_range <= 0:
        raise ValueError(f"ssim: data_range must be > 0, got {data_range}")
    h, w = actual.shape[-2:]
    x = actual.detach().double().reshape(-1, 1, h, w)
    y = expected.detach().double().reshape(-1, 1, h, w)
    kernel = _gaussian_window(window, sigma).to(x.device)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel)  # weighted mean over each window position

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return float(s.mean())
