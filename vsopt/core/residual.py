"""Residual sharing across denoising steps (DiTFastAttn): a sparse head's output corrected by the
error it made at an earlier step, measured there against exact attention.

DiTFastAttn (Yuan et al., 2024, "DiTFastAttn: Attention Compression for Diffusion Transformer
Models") runs window attention in most steps and full attention in a few. At a full step it also
computes the window output and keeps the difference of the two; at the window steps after it, it
adds that difference back. The point is that the error of a fixed sparse approximation of one
head is a smooth function of the denoising step: what the dropped keys contributed at step s is
close to what they contribute at s + 1, so subtracting the stale error removes most of the fresh
one. Per head and query row t, with S the head's sparse output (its kept blocks, plus the pooled
remainder for a PSA head) and O exact attention:

  measuring step s (the kept blocks, the dropped blocks through the kernel, the pooled remainder
  where the head has one):   R_t = O_t(s) - S_t(s),   out_t = O_t(s)            exact
  correcting step t' > s (the kept blocks under step s's masks, the pooled remainder where the
  head has one):             out_t = S_t(t') + R_t(s)

so the output is O(s) + (S(t') - S(s)): the exact output of the measuring step moved by how much
the sparse output moved since. Beside the softmax-mass correction (vsopt.core.rettention, which
outputs O(s) + rho(s) (o_K(t') - o_K(s)) for a plain sparse head) it keeps the sparse output's
change unscaled and it corrects a PSA head's pooled output too, whose measuring step the mass
correction does not make exact. It is a HeadPlan.renorm with kind "residual": the same phases,
step variants and per-site state buffers (the residual in the "resid" slot; no rho). A measuring
step costs what the exact measuring step of the mass correction costs (every block), a correcting
step the sparse head plus one add: the GPU kernel is unchanged, the add runs as an ATen op after
it (like the mass correction's epilogue; not fused).

Written once against lse.Emitter: semantics runs it eagerly, passes/lower_plan emits the same ops.
"""
from __future__ import annotations

from typing import Any

import torch

from vsopt.core.lse import merge_partials

aten = torch.ops.aten


def measure(em, kept: tuple[Any, Any], dropped: tuple[Any, Any], pooled: tuple[Any, Any] | None = None
            ) -> tuple[Any, Any]:
    """A measuring step: (exact out float32 (B, H, N, D), residual float32 (B, H, N, D)) from the
    kept partial (o_K, lse_K), the dropped blocks' exact partial and, for a PSA head, its pooled
    remainder's partial; the sparse output is o_K (plain) or o_K merged with the pooled part."""
    exact, _ = merge_partials(em, [kept, dropped])
    sparse = kept[0] if pooled is None else merge_partials(em, [kept, pooled])[0]
    return exact, em.op(aten.sub.Tensor, exact, sparse)


def correct(em, sparse, resid) -> Any:
    """A correcting step: the sparse output plus the measuring step's residual, float32."""
    s = em.op(aten._to_copy.default, sparse, dtype=torch.float32)
    return em.op(aten.add.Tensor, s, em.op(aten._to_copy.default, resid, dtype=torch.float32))


def reference_residual(measured: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       current: tuple[torch.Tensor, torch.Tensor, torch.Tensor], masks: torch.Tensor, scale: float,
                       block_m: int, block_n: int, pooled: bool = False) -> torch.Tensor:
    """The corrected output written from its definition in float64 (tests): S(current) + O(measured)
    - S(measured), with O exact softmax attention and S the kept blocks' own softmax (rows keeping
    nothing: 0), or PSA's pooled softmax (core.pooled.reference_pooled_attention) when `pooled`.
    q (B, H, N, D); k, v (B, Hkv, N, D); masks (B or 1, H, QB, KB) the kept blocks."""
    from vsopt.core.pooled import reference_pooled_attention

    def parts(qkv):
        q, k, v = (x.double() for x in qkv)
        H = q.shape[1]
        k, v = (x.repeat_interleave(H // x.shape[1], 1) for x in (k, v))
        s = scale * q @ k.transpose(-1, -2)
        exact = torch.softmax(s, -1) @ v
        if pooled:
            return exact, reference_pooled_attention(q, k, v, masks, scale, block_m, block_n)
        nq, nk = q.shape[2], k.shape[2]
        keep = masks.repeat_interleave(block_m, 2)[:, :, :nq].repeat_interleave(block_n, 3)[..., :nk]
        return exact, torch.nan_to_num(torch.softmax(s.masked_fill(~keep, float("-inf")), -1)) @ v

    o_m, s_m = parts(measured)
    _, s_c = parts(current)
    return s_c + (o_m - s_m)


__all__ = ["correct", "measure", "reference_residual"]
