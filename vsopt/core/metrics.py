"""Accuracy and attention-structure metrics shared by calibration, demo, diff and bench."""
from __future__ import annotations

import math

import torch


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int = 64, block_n: int = 64,
                         query_chunk: int = 1024) -> torch.Tensor:
    """Exact block-level attention mass, without materializing the N x N map at once.

    q: (B, H, Nq, D); k: (B, Hkv, Nk, D) (Hkv divides H). Returns float32 (B, H, QB, KB) with
    QB = ceil(Nq / block_m), KB = ceil(Nk / block_n): entry [b, h, i, j] is the softmax
    probability mass that the queries of block i give to the keys of block j, averaged over the
    queries of block i (so each row sums to 1). Computed in float32, `query_chunk` query rows at a
    time (memory O(query_chunk * Nk) per head).
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
        p = torch.softmax(q[:, :, start:stop].float() @ kf.transpose(-1, -2) * scale, dim=-1)  # (B,H,c,Nk)
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


def ssim(actual: torch.Tensor, expected: torch.Tensor, data_range: float | None = None, window: int = 7,
         sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) over every 2-D image in the last two axes.

    actual, expected: (..., H, W), e.g. a video (B, C, F, H, W): each (b, c, f) plane is compared
    on its own with a Gaussian window (size `window`, clipped to the image, std `sigma`), in
    float64; data_range defaults to expected's max - min. Returns the mean SSIM (1 = identical)."""
    if actual.shape != expected.shape or actual.dim() < 2:
        raise ValueError(f"ssim needs two tensors of the same shape (..., H, W), got {tuple(actual.shape)} "
                         f"and {tuple(expected.shape)}")
    a = actual.double().reshape(-1, 1, *actual.shape[-2:])
    e = expected.double().reshape(-1, 1, *expected.shape[-2:])
    rng = float(e.max() - e.min()) if data_range is None else data_range
    rng = rng if rng > 0 else 1.0
    size = min(window, a.shape[-1], a.shape[-2])
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]

    def blur(t):
        return torch.nn.functional.conv2d(t, kernel)

    mu_a, mu_e = blur(a), blur(e)
    var_a = blur(a * a) - mu_a ** 2
    var_e = blur(e * e) - mu_e ** 2
    cov = blur(a * e) - mu_a * mu_e
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    s = ((2 * mu_a * mu_e + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_e ** 2 + c1) * (var_a + var_e + c2))
    return float(s.mean())
