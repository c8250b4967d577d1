"""The backward of torch.ops.vsopt.attention, so a model compiled in training mode keeps working.

vsopt/core/ops.py registers it with torch.library.register_autograd next to the op, so the op has
autograd as soon as it exists. The backward recomputes the probabilities in float32 from the saved
q, k, v: exact, O(N^2) memory, meant for correctness in training runs, not for speed. The mask
gets no gradient.

    T = tanh(scale * q k^T / c) (softcap c > 0; without a cap the scores are scale * q k^T, T' = 1)
    P = softmax(c * T + mask)              dV = P^T dO
    dP = dO V^T                            dS = P * (dP - rowsum(dP * P)) * (1 - T^2)
    dQ = scale * dS K                      dK = scale * dS^T Q
Grouped kv heads (Hkv < Hq) get the sum of the gradients of the query heads they serve.
"""
from __future__ import annotations

import torch


def attention_setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale, is_causal, softcap = inputs
    ctx.save_for_backward(q, k, v, attn_mask if isinstance(attn_mask, torch.Tensor) else None)
    ctx.scale, ctx.is_causal, ctx.softcap = scale, is_causal, softcap


def attention_backward(ctx, grad_out):
    q, k, v, mask = ctx.saved_tensors
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    qf, do = q.float(), grad_out.float()
    s = (qf @ kf.transpose(-2, -1)) * ctx.scale
    if ctx.softcap > 0:
        t = torch.tanh(s / ctx.softcap)
        s = ctx.softcap * t
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    if ctx.is_causal:
        nq, nk = s.shape[-2:]
        keep = torch.ones(nq, nk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    dv = p.transpose(-2, -1) @ do
    dp = do @ vf.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    if ctx.softcap > 0:
        ds = ds * (1 - t * t)   # d(c tanh(x / c)) / dx
    dq = (ds @ kf) * ctx.scale
    dk = (ds.transpose(-2, -1) @ qf) * ctx.scale
    if group > 1:
        b, _, nk, d = dk.shape
        dk = dk.reshape(b, hkv, group, nk, d).sum(dim=2)
        dv = dv.reshape(b, hkv, group, nk, dv.shape[-1]).sum(dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None
