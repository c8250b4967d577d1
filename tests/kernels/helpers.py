"""Small builders shared by the kernel tests (tiny shapes: the interpreter is slow)."""
from __future__ import annotations

import torch

from vsopt.kernels.block_mask import reference as mask_ref


def block_mask(Bt: int, H: int, QB: int, KB: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Random block mask with the diagonal block kept; density 0 -> one block per row, 1 -> dense."""
    mask = torch.rand(Bt, H, QB, KB, generator=gen) < density
    diag = mask_ref.diagonal_blocks(QB, KB, 1, 1).clamp_max(KB - 1)
    return mask.scatter(-1, diag.expand(Bt, H, QB)[..., None], True)


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))
