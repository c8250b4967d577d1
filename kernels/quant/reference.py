"""Pure-PyTorch reference of the fused quantization kernels (kernels/quant/kernel.py).

Formats (the scale of a group is amax(|x|) / QMAX over the group, so the group's largest value maps
to +-QMAX; an all-zero group gets a tiny scale instead of 0):
- "int8": QMAX 127, values rounded half away from zero.
- "fp8":  float8 e4m3fn, QMAX 448, rounded to nearest by the cast.
Groups: Q per (b, h, block of block_m tokens); K per (b, h, block of block_n tokens) after
smoothing (K minus smoothing_mean(K), per (b, h, d): q . (k_j - c) = q . k_j - q . c for any c, and
softmax ignores the per-row constant q . c); V (FP8 P V only) per (b, h, d) channel over all tokens.
V in int8_int8 (and with pv_format "int8"): the same per-channel groups, INT8 codes.
P (8-bit P V only; round_probabilities_fp8): per query row and group of block keys, scaled so that
the group's largest probability is 448 (SageAttention2's per-block P scale: the full e4m3 range
whatever the group's distance to the row max), rounded, scaled back.
"""
from __future__ import annotations

import torch

from ..errors import check
from ..spec import QuantMode

QMAX = {"int8": 127.0, "fp8": 448.0}
MIN_AMAX = 1e-10
#: Token rows K's smoothing vector is averaged over (smoothing_rows).
SMOOTHING_SAMPLES = 64


def smoothing_rows(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The rows smoothing_mean averages over a key sequence of n tokens: i * n // S for i < S
    (S = SMOOTHING_SAMPLES, a fixed stride over the sequence) when n > S, else all n rows."""
    if n <= SMOOTHING_SAMPLES:
        return torch.arange(n, device=device)
    return torch.arange(SMOOTHING_SAMPLES, device=device) * n // SMOOTHING_SAMPLES


def smoothing_mean(k: torch.Tensor) -> torch.Tensor:
    """c, the vector K smoothing subtracts from every key: K's float32 mean over smoothing_rows,
    (B, H, D). Any per-(b, h) c keeps the softmax exact and only needs to be near the mean to shrink
    K's range, so a 64-row sample does, and K's quantization needs no full pass over K first. Every
    user of c (kernel.py, fusable.py, smoothing_bias, core/lse.py, plugins/onnx) mirrors these rows."""
    return k.index_select(2, smoothing_rows(k.shape[2], k.device)).float().mean(dim=2)


def round_to_format(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x already divided by its scale -> the value the stored code represents (same dtype)."""
    if fmt == "int8":
        return torch.sign(x) * torch.floor(x.abs() + 0.5)
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def quantize_blocks(x: torch.Tensor, block: int, fmt: str, mean: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, N, D) -> (codes as float (B, H, N, D), scale float32 (B, H, ceil(N/block))).

    mean (B, H, D), if given, is subtracted first (K smoothing). Dequantize: codes * scale."""
    B, H, N, D = x.shape
    x = x.float() if x.dtype != torch.float64 else x
    if mean is not None:
        x = x - mean[:, :, None, :].to(x.dtype)
    nb = -(-N // block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, nb * block - N))
    groups = padded.view(B, H, nb, block, D)
    scale = groups.abs().amax(dim=(3, 4)).clamp_min(MIN_AMAX) / QMAX[fmt]
    codes = round_to_format(groups / scale[..., None, None], fmt)
    return codes.view(B, H, nb * block, D)[:, :, :N], scale.float()


def quantize_channels_fp8(v: torch.Tensor, fmt: str = "fp8") -> tuple[torch.Tensor, torch.Tensor]:
    """v (B, H, N, D) -> (codes as float (B, H, N, D), scale float32 (B, H, D)), per-channel FP8
    (fmt "int8": per-channel INT8, the experimental INT8 P V)."""
    v = v.float() if v.dtype != torch.float64 else v
    scale = v.abs().amax(dim=2).clamp_min(MIN_AMAX) / QMAX[fmt]
    return round_to_format(v / scale[:, :, None, :], fmt), scale.float()


def check_pv_format(mode: QuantMode, pv_format: str | None) -> str | None:
    """pv_format: None (the mode's own), or "int8" / "fp8" for a mode whose P V is 8-bit (int8_int8
    takes only its own "int8": INT8 Q K with FP8 P V is int8_fp8). Returns the P V format in use
    (None: P V in the input dtype)."""
    check(pv_format in (None, "fp8", "int8"), f"pv_format must be None, 'fp8' or 'int8', got {pv_format!r}")
    check(pv_format is None or mode.pv_is_8bit,
          f"pv_format {pv_format!r} needs a mode with 8-bit P V (fp8, int8_fp8, int8_int8), got {mode.value!r}")
    check(pv_format in (None, mode.pv_format) or mode is not QuantMode.INT8_INT8,
          f"pv_format {pv_format!r} contradicts quant 'int8_int8' (INT8 Q K with FP8 P V is 'int8_fp8')")
    return pv_format or mode.pv_format


def fake_quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quant: QuantMode | str, block_m: int,
                      block_n: int, pv_format: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize then dequantize q, k, v as the kernels do in `quant` mode (K comes back smoothed:
    minus smoothing_mean(k), which only a soft cap or a merge by LSE notices; see smoothing_bias). pv_format
    "int8" (FP8 P V modes): V per channel in INT8 instead of e4m3, as in int8_int8."""
    mode = QuantMode.parse(quant, "fake_quantize_qkv: quant")
    check(mode is not QuantMode.NONE, f"fake_quantize_qkv: quant must be a quantized mode, got {quant!r}")
    pv_format = check_pv_format(mode, pv_format)
    fmt = mode.qk_format
    qc, qs = quantize_blocks(q, block_m, fmt)
    kc, ks = quantize_blocks(k, block_n, fmt, mean=smoothing_mean(k))
    q_hat = (qc * qs.repeat_interleave(block_m, dim=2)[:, :, : q.shape[2], None]).to(q.dtype)
    k_hat = (kc * ks.repeat_interleave(block_n, dim=2)[:, :, : k.shape[2], None]).to(k.dtype)
    if pv_format is not None:
        vc, vs = quantize_channels_fp8(v, pv_format)
        v = (vc * vs[:, :, None, :]).to(v.dtype)
    return q_hat, k_hat, v


def round_probabilities_fp8(scores: torch.Tensor, row_max: torch.Tensor, block: int, fmt: str = "fp8") -> torch.Tensor:
    """exp(scores - row_max) with each (row, group of `block` keys) rounded to e4m3 as the FP8 P V
    kernels do: p~ = round(exp(s - gmax) * 448) with gmax the group's row max, then
    p = p~ * exp(gmax - row_max) / 448. scores (..., Nk) with -inf for masked keys; row_max (..., 1).
    fmt "int8": the experimental INT8 P V, 127 for 448 and rounding to integers."""
    nk = scores.shape[-1]
    nb = -(-nk // block)
    padded = torch.nn.functional.pad(scores, (0, nb * block - nk), value=float("-inf"))
    groups = padded.view(*scores.shape[:-1], nb, block)
    gmax = groups.amax(dim=-1, keepdim=True)
    live = torch.isfinite(gmax)
    gref = torch.where(live, gmax, torch.zeros_like(gmax))
    p = round_to_format(torch.exp(groups - gref) * QMAX[fmt], fmt)
    weight = torch.where(live, torch.exp(gref - row_max[..., None]) / QMAX[fmt], torch.zeros_like(gmax))
    return (p * weight).view(*scores.shape[:-1], nb * block)[..., :nk]


def smoothing_bias(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q . smoothing_mean(K) per query row, (B, Hq, Nq), in q's float dtype (at least float32): the
    per-row constant K smoothing removes from the scores. Softmax ignores it; a soft cap does not, so
    the capped kernels add it back (from the unquantized q) before the tanh. Grouped kv heads: each
    query head takes its kv head's vector."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    mean = smoothing_mean(k).to(work).repeat_interleave(q.shape[1] // k.shape[1], dim=1)   # (B, Hq, D)
    return torch.einsum("bhnd,bhd->bhn", q.to(work), mean)
