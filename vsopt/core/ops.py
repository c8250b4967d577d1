"""vsopt's custom ops (torch.ops.vsopt.*), registered through torch.library.

Every op here is functional (returns new tensors, mutates nothing) and has a fake (meta)
implementation so that Dynamo, Inductor and torch.export can trace it. Layout is (B, H, N, D).

- vsopt::attention        exact dense attention; what every detected site is first rewritten into.
- vsopt::permute_tokens   per-head token reorder (PARO): y[:, h, i] = x[:, h, perm[h, i]].
- vsopt::unpermute_tokens its inverse:              y[:, h, perm[h, i]] = x[:, h, i].
The block-sparse / quantized ops that run the Triton kernels are registered further down.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import KernelInputError

# ----------------------------------------------------------------------------- dense attention


def _check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise KernelInputError(f"vsopt.attention expects 4-D (B, H, N, D) q/k/v, got {tuple(q.shape)}, "
                               f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise KernelInputError(f"vsopt.attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, "
                               f"v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise KernelInputError(f"vsopt.attention: query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")


@torch.library.custom_op("vsopt::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              scale: float = 1.0, is_causal: bool = False) -> torch.Tensor:
    """Exact dense attention, softmax(q k^T * scale + mask) v, in (B, H, N, D) layout.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) with Hq a multiple of Hkv
    (grouped-query attention); attn_mask broadcastable to (B, Hq, Nq, Nk), boolean (True = keep)
    or additive. Returns (B, Hq, Nq, Dv) in q's dtype. Runs torch SDPA, the fastest exact path on
    each device (cuDNN / flash on Hopper), so a dense plan costs nothing over the original model.
    """
    _check_attention_inputs(q, k, v)
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale).contiguous()


@attention.register_fake
def _(q, k, v, attn_mask=None, scale=1.0, is_causal=False):
    _check_attention_inputs(q, k, v)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# ----------------------------------------------------------------------------- token permutation


def _check_perm(x: torch.Tensor, perm: torch.Tensor, op: str) -> None:
    if x.dim() != 4 or perm.dim() != 2 or perm.shape[0] not in (1, x.shape[1]) or perm.shape[1] != x.shape[2]:
        raise KernelInputError(f"vsopt.{op}: x must be (B, H, N, D) and perm (H or 1, N); got x {tuple(x.shape)}, "
                               f"perm {tuple(perm.shape)}")
    if perm.dtype != torch.int64:
        raise KernelInputError(f"vsopt.{op}: perm must be int64, got {perm.dtype}")


def _gather_index(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    B, H, N, D = x.shape
    return perm.to(x.device)[None, :, :, None].expand(B, H, N, D)


@torch.library.custom_op("vsopt::permute_tokens", mutates_args=())
def permute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Reorder tokens per head: y[:, h, i] = x[:, h, perm[h, i]]. x: (B, H, N, D); perm: (H or 1, N)
    int64, each row a permutation of range(N)."""
    _check_perm(x, perm, "permute_tokens")
    return torch.gather(x, 2, _gather_index(x, perm))


@permute_tokens.register_fake
def _(x, perm):
    _check_perm(x, perm, "permute_tokens")
    return torch.empty_like(x)


@torch.library.custom_op("vsopt::unpermute_tokens", mutates_args=())
def unpermute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo permute_tokens with the same perm: y[:, h, perm[h, i]] = x[:, h, i]."""
    _check_perm(x, perm, "unpermute_tokens")
    return torch.empty_like(x).scatter_(2, _gather_index(x, perm), x)


@unpermute_tokens.register_fake
def _(x, perm):
    _check_perm(x, perm, "unpermute_tokens")
    return torch.empty_like(x)
