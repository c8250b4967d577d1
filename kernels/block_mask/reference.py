"""Pure-PyTorch reference of the block-mask helpers (kernels/block_mask/kernel.py, launch.py).

- mask_to_table(mask bool (Bt, H, QB, KB)) -> kv_indices int32 (Bt, H, QB, KB), kv_counts int32
  (Bt, H, QB): row r lists the key blocks where mask is True, ascending, then zeros.
- pool_blocks(x (B, H, N, D), block) -> float32 (B, H, ceil(N/block), D): mean over each block's
  tokens (the ragged last block: over the tokens it has).
- block_scores(q, k, scale, block_m, block_n) -> float32 (B, H, QB, KB): softmax over key blocks of
  pool(q) . pool(k) * scale (k's heads repeated for GQA).
- topk_block_mask(scores, k) / mass_block_mask(scores, mass) -> bool (B, H, QB, KB): per row, the k
  highest-scoring blocks, or the fewest highest-scoring blocks whose scores sum to >= mass; both
  always keep the diagonal block diagonal_block(qb) = min(qb * block_m // block_n, KB - 1).
"""
from __future__ import annotations

import torch


def mask_to_table(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    KB = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    # Sort key: selected blocks first, in ascending order; unselected ones after.
    key = torch.where(mask, torch.arange(KB, device=mask.device), KB + torch.arange(KB, device=mask.device))
    order = torch.sort(key, dim=-1).values
    indices = torch.where(order < KB, order, torch.zeros_like(order)).to(torch.int32)
    return indices, counts


def block_sizes(n: int, block: int, device=None) -> torch.Tensor:
    """float32 (ceil(n / block),): the number of tokens in each block (the last may be ragged)."""
    nb = -(-n // block)
    # computed on the device from an arange: no host-to-device copy, so it runs inside a CUDA graph capture
    return (n - block * torch.arange(nb, device=device)).clamp(max=block).float()


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    B, H, N, D = x.shape
    nb = -(-N // block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block - N))
    sums = padded.view(B, H, nb, block, D).sum(3)
    return sums / block_sizes(N, block, x.device)[:, None]


def block_scores_from_pooled(qp: torch.Tensor, kp: torch.Tensor, key_block_sizes: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """softmax over key blocks of qp . kp * scale + log(key block size); kp's heads are repeated
    to qp's (GQA). The log term counts a key block as its tokens (n equal keys hold n * exp(s)),
    so a ragged last block is not overweighted."""
    group = qp.shape[1] // kp.shape[1]
    if group > 1:
        kp = kp.repeat_interleave(group, dim=1)
    logits = torch.matmul(qp, kp.transpose(-1, -2)) * scale + key_block_sizes.log()
    return torch.softmax(logits, dim=-1)


def block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int, block_n: int) -> torch.Tensor:
    return block_scores_from_pooled(pool_blocks(q, block_m), pool_blocks(k, block_n),
                                    block_sizes(k.shape[2], block_n, k.device), scale)


def diagonal_blocks(QB: int, KB: int, block_m: int, block_n: int, device=None) -> torch.Tensor:
    """int64 (QB,): the key block holding the first token of each query block (clamped to KB - 1)."""
    return (torch.arange(QB, device=device) * block_m // block_n).clamp_max(KB - 1)


def _with_diagonal(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    QB, KB = mask.shape[-2:]
    diag = diagonal_blocks(QB, KB, block_m, block_n, mask.device)
    return mask.scatter(-1, diag.expand(*mask.shape[:-1])[..., None], True)


def topk_block_mask(scores: torch.Tensor, k: int, block_m: int, block_n: int) -> torch.Tensor:
    KB = scores.shape[-1]
    top = scores.topk(min(k, KB), dim=-1).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, top, True)
    return _with_diagonal(mask, block_m, block_n)


def mass_block_mask(scores: torch.Tensor, mass: float, block_m: int, block_n: int) -> torch.Tensor:
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    before = sorted_scores.cumsum(-1) - sorted_scores          # mass of the blocks ranked above
    keep_sorted = before < mass * scores.sum(-1, keepdim=True)  # keep until the mass is reached
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, order, keep_sorted)
    return _with_diagonal(mask, block_m, block_n)
