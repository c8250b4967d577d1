"""Pure-PyTorch reference of block-sparse attention (the CPU path of vsopt::block_sparse_attention).

Layout: q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D), Hq a multiple of Hkv (grouped-query attention).
The sparsity is a table: kv_indices int32 (Bt, Hq, QB, MAXK) lists, for query block qb (tokens
[qb*block_m, (qb+1)*block_m)), the key blocks it visits (key block kb = tokens
[kb*block_n, (kb+1)*block_n)); kv_counts int32 (Bt, Hq, QB) says how many entries are valid.
Bt is 1 (one table for the whole batch) or B. A query row that visits no block outputs 0.

The reference computes in float32 (float64 if the inputs are float64) and returns q's dtype.
softcap > 0 caps the scaled scores, s -> softcap * tanh(s / softcap), before the mask and the
softmax. For the quantized modes it runs the same attention on fake-quantized (quantized then
dequantized) Q, K and V from kernels.quant.reference, and in the 8-bit P V modes it rounds P as the
kernel does (quant_ref.round_probabilities_fp8: per row and key block, scaled by the block's row
max to e4m3's 448, or to INT8's 127 in int8_int8); so the kernel and the reference see the same roundings, and what is left
between them is summation order, exp2 ulps and the FP8 tensor core's accumulator.
"""
from __future__ import annotations

import torch

from ..quant import reference as quant_ref
from ..spec import QuantMode


def table_to_block_mask(kv_indices: torch.Tensor, kv_counts: torch.Tensor, nk: int, block_n: int) -> torch.Tensor:
    """Expand a block table to a boolean block mask (Bt, H, QB, KB), True = visited."""
    Bt, H, QB, MAXK = kv_indices.shape
    KB = -(-nk // block_n)
    valid = torch.arange(MAXK, device=kv_indices.device) < kv_counts[..., None].long()   # (Bt,H,QB,MAXK)
    block_mask = torch.zeros(Bt, H, QB, KB + 1, dtype=torch.bool, device=kv_indices.device)
    # Invalid entries are routed to the spare column KB and dropped.
    idx = torch.where(valid, kv_indices.long(), torch.full_like(kv_indices.long(), KB))
    block_mask.scatter_(3, idx, True)
    return block_mask[..., :KB]


def table_to_token_mask(kv_indices: torch.Tensor, kv_counts: torch.Tensor, nq: int, nk: int,
                        block_m: int, block_n: int) -> torch.Tensor:
    """Expand a block table to a boolean token mask (Bt, H, Nq, Nk), True = attend."""
    block_mask = table_to_block_mask(kv_indices, kv_counts, nk, block_n)
    token_mask = block_mask.repeat_interleave(block_m, dim=2).repeat_interleave(block_n, dim=3)
    return token_mask[:, :, :nq, :nk]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_mask: torch.Tensor,
                     scale: float, softcap: float = 0.0, p_fp8_block: int | None = None,
                     score_bias: torch.Tensor | None = None, p_format: str = "fp8",
                     blocks: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(cap((q k^T + bias) * scale), masked) v with GQA, in q's (float) dtype; rows with no
    key give 0. cap(s) = softcap * tanh(s / softcap) when softcap > 0, else s; score_bias (B, Hq,
    Nq) per query row (K smoothing's q . c), or none. p_fp8_block: round the probabilities to
    e4m3 per row and group of that many keys, as the FP8 P V kernels do (p_format "int8": to INT8,
    the experimental INT8 P V).

    blocks (block_m, block_n), with Nq and Nk multiples of them: token_mask is a block mask (Bt,
    Hq, QB, KB), applied to the scores viewed as blocks (the same values masked as its token mask
    would: the same result, without an Nq x Nk mask).

    Returns (out (B, Hq, Nq, D), lse (B, Hq, Nq) natural-log log-sum-exp, -inf for empty rows)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k)
    if score_bias is not None:
        s = s + score_bias[..., None].to(s.dtype)
    s = s * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = _fill_dropped(s, token_mask, float("-inf"), blocks)
    lse = torch.logsumexp(s, dim=-1)
    m = lse[..., None].masked_fill(torch.isinf(lse[..., None]), 0.0)
    if p_fp8_block is not None:
        p = _fill_dropped(quant_ref.round_probabilities_fp8(s, m, p_fp8_block, p_format), token_mask, 0.0, blocks)
    else:  # exp(-inf - m) is exactly 0 at every dropped score (m is finite): nothing to fill
        p = torch.exp(s - m)
    return torch.einsum("bhqk,bhkd->bhqd", p, v), lse


def _fill_dropped(x: torch.Tensor, mask: torch.Tensor, value: float, blocks: tuple[int, int] | None) -> torch.Tensor:
    """x with `value` where mask is False: a token mask (.., Nq, Nk), or with blocks a block mask
    (Bt, H, QB, KB) broadcast over the (block_m, block_n) tokens of each block (a new tensor)."""
    if blocks is None:
        return x.masked_fill(~mask, value)
    B, H, nq, nk = x.shape
    bm, bn = blocks
    view = x.reshape(B, H, nq // bm, bm, nk // bn, bn)
    return view.masked_fill(~mask[:, :, :, None, :, None], value).reshape(B, H, nq, nk)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                           kv_counts: torch.Tensor, scale: float, block_m: int, block_n: int,
                           quant: QuantMode | str = "none", softcap: float = 0.0, pv_format: str | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for vsopt::block_sparse_attention; returns (out in q's dtype, lse float32).
    pv_format "int8" (FP8 P V modes; the launcher's experimental option): P and V in INT8, as
    int8_int8 runs them."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(work), k.to(work), v.to(work)
    mode = QuantMode.parse(quant, "block_sparse_attention: quant")
    pv_format = quant_ref.check_pv_format(mode, pv_format)
    bias = None
    if mode is not QuantMode.NONE:
        if softcap > 0:   # the q . smoothing_mean(K) that smoothing removes matters under a cap: added back
            bias = quant_ref.smoothing_bias(qf, kf)
        qf, kf, vf = quant_ref.fake_quantize_qkv(qf, kf, vf, mode, block_m, block_n, pv_format)
    nq, nk = q.shape[2], k.shape[2]
    if nq % block_m == 0 and nk % block_n == 0:  # mask the scores block by block (no Nq x Nk mask)
        mask, blocks = table_to_block_mask(kv_indices, kv_counts, nk, block_n), (block_m, block_n)
    else:
        mask, blocks = table_to_token_mask(kv_indices, kv_counts, nq, nk, block_m, block_n), None
    mask = mask.expand(q.shape[0], -1, -1, -1)
    out, lse = masked_attention(qf, kf, vf, mask, scale, softcap, block_n if pv_format else None, bias,
                                pv_format or "fp8", blocks)
    return out.to(q.dtype), lse.float()
