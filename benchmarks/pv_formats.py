"""P V formats against issue 16's accuracy target, emulated in float32 on the CPU (no GPU needed).

    python benchmarks/pv_formats.py     (~1 minute on one core; prints one line per case)

INT8 Q K with K smoothing (kernels/quant/reference.fake_quantize_qkv) in every variant but the last
two, then P and V rounded as named: e4m3 or INT8 per row and 128-key tile (P, scaled to the format's
largest value), e4m3 or INT8 per channel (V), "fp8res" = a second e4m3 product of the residual
(x - round(x)) * 16; qk "int8tok": INT8 Q K with K scaled per token instead of per block of 128
tokens (not in the kernel: an emulation of what a per-key scale would buy). The table in
docs/KERNELS.md ("P V formats") comes from this script.
"""
import torch
from vsopt.kernels.quant import reference as qr

N, D, H, BLK = 2048, 128, 4, 128
def inputs(kind, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
    if kind == "structured":
        k[:, :, [5, 700, 1800]] *= 8.0
        k = k + 2.0 * torch.randn(1, H, 1, D, generator=g)
        q = 2.0 * q
        v = 20.0 * v + 5.0
    return q, k, v
def rel(a, b): return float((a-b).norm()/b.norm())
def cos(a,b): return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))
def fp8(x): return x.to(torch.float8_e4m3fn).float()
def int8(x): return torch.sign(x)*torch.floor(x.abs()+0.5)
def p_round(s, m, blk, fmt):
    nb = N // blk
    gr = s.view(*s.shape[:-1], nb, blk)
    gmax = gr.amax(-1, keepdim=True); live = torch.isfinite(gmax); gref = torch.where(live, gmax, torch.zeros_like(gmax))
    e = torch.exp(gr - gref)
    if fmt == "fp8": p = fp8(e*448)/448
    elif fmt == "int8": p = int8(e*127)/127
    elif fmt == "fp8res":
        hi = fp8(e*448); lo = fp8((e*448 - hi)*16)/16; p = (hi+lo)/448
    else: p = e
    w = torch.where(live, torch.exp(gref - m[..., None]), torch.zeros_like(gmax))
    return (p*w).view_as(s)
def v_round(v, fmt):
    if fmt == "none": return v
    amax = v.abs().amax(2, keepdim=True)
    if fmt == "fp8": s = amax/448; return fp8(v/s)*s
    if fmt == "fp8res":
        s = amax/448; hi = fp8(v/s); lo = fp8((v/s - hi)*16)/16; return (hi+lo)*s
    if fmt == "int8": s = amax/127; return int8(v/s)*s
    if fmt == "fp8smooth":
        mu = v.mean(2, keepdim=True); x = v - mu; s = x.abs().amax(2, keepdim=True)/448; return fp8(x/s)*s + mu
def attn(q,k,v,mask,qk="int8",p="fp8",vf="fp8"):
    if qk == "int8tok":   # Q per block; K smoothed, one scale per token (row)
        qc, qs = qr.quantize_blocks(q, BLK, "int8")
        qq = qc * qs.repeat_interleave(BLK, 2)[..., None]
        x = k - k.mean(2, keepdim=True)
        ks = x.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 127
        kk = int8(x / ks) * ks
    elif qk != "none":
        qq, kk, _ = qr.fake_quantize_qkv(q, k, v, "int8" if qk=="int8" else "fp8", BLK, BLK)
    else: qq, kk = q, k
    s = (qq @ kk.transpose(-1,-2)) * D**-0.5
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    pp = p_round(s, lse, BLK, p)
    return pp @ v_round(v, vf)
variants = [("int8", "none", "none"), ("int8", "none", "fp8"), ("int8", "fp8", "fp8"), ("int8", "fp8res", "fp8"),
            ("int8", "fp8", "fp8res"), ("int8", "int8", "int8"), ("int8tok", "none", "none"), ("int8tok", "int8", "int8"),
            ("fp8", "int8", "int8"), ("fp8", "fp8", "fp8")]
for kind in ["random","structured"]:
    q,k,v = inputs(kind, 1)
    for dens in [0.1, 0.5, 1.0]:
        g = torch.Generator().manual_seed(3)
        bm = torch.rand(1, H, N//BLK, N//BLK, generator=g) < dens
        bm |= torch.eye(N//BLK, dtype=torch.bool)
        mask = bm.repeat_interleave(BLK,2).repeat_interleave(BLK,3)
        s = (q @ k.transpose(-1,-2))*D**-0.5
        exact = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
        for var in variants:
            o = attn(q,k,v,mask,*var)
            print(kind, dens, "qk=%s p=%s v=%s" % var, f"cos {cos(o,exact):.5f} rel {rel(o,exact):.4f}", flush=True)
