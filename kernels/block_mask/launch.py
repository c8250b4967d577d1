"""Launchers of the block-mask helpers (shapes and math in reference.py).

mask_to_table and pool_blocks run Triton kernels; block_scores multiplies the pooled blocks with
one batched matmul and a softmax (QB x KB per head: small). The top-k and mass masks need no
kernel of their own (a sort of KB values per row): reference.topk_block_mask / mass_block_mask
run as they are on the GPU.
"""
from __future__ import annotations

import torch
import triton

from ..errors import check
from ..runtime import plain_eager, triton_launcher
from . import kernel, reference


def mask_to_table(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool (Bt, H, QB, KB) -> (kv_indices int32 (Bt, H, QB, KB), kv_counts int32 (Bt, H, QB))."""
    check(mask.dim() == 4 and mask.dtype == torch.bool,
          f"mask_to_table: mask must be bool (Bt, H, QB, KB), got {mask.dtype} {tuple(mask.shape)}")
    mask = mask.contiguous()
    rows, KB = mask.numel() // mask.shape[-1], mask.shape[-1]
    indices = torch.zeros(mask.shape, dtype=torch.int32, device=mask.device)
    counts = torch.empty(mask.shape[:-1], dtype=torch.int32, device=mask.device)
    if rows:
        chunk = min(1024, triton.next_power_of_2(KB))
        triton_launcher(kernel._mask_to_table_kernel, plain_eager(mask))[(rows,)](
            mask, indices, counts, KB, CHUNK=chunk, num_warps=4)
    return indices, counts


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (B, H, N, D) -> float32 (B, H, ceil(N/block), D), the mean of each token block."""
    check(x.dim() == 4 and x.stride(-1) == 1, f"pool_blocks: x must be (B, H, N, D) with contiguous D, got "
          f"shape {tuple(x.shape)} strides {x.stride()}")
    B, H, N, D = x.shape
    check(D & (D - 1) == 0 and block & (block - 1) == 0 and block >= 16,
          f"pool_blocks: head_dim ({D}) and block ({block}) must be powers of two, block >= 16")
    nb = triton.cdiv(N, block)
    out = torch.empty((B, H, nb, D), dtype=torch.float32, device=x.device)
    triton_launcher(kernel._pool_blocks_kernel, plain_eager(x))[(nb, B * H)](
        x, out, H, N, nb, x.stride(0), x.stride(1), x.stride(2), BLOCK=block, HEAD_DIM=D, num_warps=4)
    return out


def block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int, block_n: int) -> torch.Tensor:
    """float32 (B, Hq, QB, KB): softmax over key blocks of pool(q) . pool(k) * scale + log(key
    block size) (see reference.block_scores_from_pooled)."""
    check(q.dim() == 4 and k.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3]
          and q.shape[1] % k.shape[1] == 0,
          f"block_scores: q (B, Hq, N, D) and k (B, Hkv, N, D) with Hq % Hkv == 0 expected, got "
          f"{tuple(q.shape)}, {tuple(k.shape)}")
    return reference.block_scores_from_pooled(pool_blocks(q, block_m), pool_blocks(k, block_n),
                                              reference.block_sizes(k.shape[2], block_n, k.device), scale)
