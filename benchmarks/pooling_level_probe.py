"""Site-level probe: relative error of kept top blocks (oracle block mass, model order) with the
dropped blocks dropped / mean-pooled at 64, 32, 16, 8 tokens per pooled key. Dense calls of the
bench's scored clip (4x32x32, 8 steps), steps 0, 4, 7 (docs/BENCH.md, session 8, "Pooling level").

    python3 benchmarks/pooling_level_probe.py OUT.json     # CPU, a few minutes; prints the means
"""
import json, math, sys, torch
from vsopt.benchmark import BenchSettings, Method, PlanScorer
from vsopt.models.model import load_shipped

def attn_pooled(q, k, v, keep, scale, bm, bn, p):
    # keep (B,H,QB,KB) bool; p: tokens per pooled key (None: drop)
    B, H, N, D = q.shape
    s = (q @ k.transpose(-1, -2)) * scale
    tok = keep.repeat_interleave(bm, 2).repeat_interleave(bn, 3)[:, :, :N, :N]
    s_kept = s.masked_fill(~tok, float("-inf"))
    if p is None:
        return torch.softmax(s_kept, -1) @ v
    kp = k.reshape(B, H, N // p, p, D).mean(3); vp = v.reshape(B, H, N // p, p, D).mean(3)
    sp = (q @ kp.transpose(-1, -2)) * scale + math.log(p)
    keep_p = keep.repeat_interleave(bm, 2)[:, :, :N].repeat_interleave(bn // p, 3)
    sp = sp.masked_fill(keep_p, float("-inf"))
    allsc = torch.cat([s_kept, sp], -1)
    w = torch.softmax(allsc, -1)
    return w[..., :N] @ v + w[..., N:] @ vp

ref = load_shipped(device="cpu", dtype=torch.float32).eval()
sc = PlanScorer(ref, BenchSettings(methods=(Method.VSOPT,), densities=(0.3,), steps=8, clip=(4, 32, 32)))
res = {}
for step in (0, 4, 7):
    for site in sc.sites:
        if not site.is_self_attention: continue
        c = sc.dense_calls_by_step[step][site.site_id]
        q, k, v = c.q.float(), c.k.float(), c.v.float()
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1); v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        B, H, N, D = q.shape; bm = bn = 64
        exact = torch.softmax((q @ k.transpose(-1, -2)) * c.scale, -1)
        out = exact @ v
        mass = exact.reshape(B, H, N // bm, bm, N // bn, bn).sum((3, 5))
        for dens in (0.2, 0.3):
            kk = max(1, round(dens * (N // bn)))
            idx = mass.topk(kk, -1).indices
            keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, idx, True)
            for p in (None, 64, 32, 16, 8):
                o = attn_pooled(q, k, v, keep, c.scale, bm, bn, p)
                e = float((o - out).pow(2).sum() / out.pow(2).sum()) ** 0.5
                res.setdefault(f"{dens}/{p}", []).append(e)
        print(step, site.site_id, {k_: round(v_[-1], 3) for k_, v_ in res.items()}, flush=True)
print(json.dumps({k_: sum(v_) / len(v_) for k_, v_ in res.items()}, indent=1))
json.dump(res, open(sys.argv[1], "w"))
