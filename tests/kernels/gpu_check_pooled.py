"""GPU check of the pooled remainder (PSA, vsopt.core.pooled) at Wan-like sizes: the kept blocks
through the Triton kernel (vsopt.block_sparse_attention_lse), the pooled remainder and the merge
as ATen ops, against the pooled softmax computed densely in float64; and its time beside plain
block-sparse attention over the same kept blocks.

    python3 tests/kernels/gpu_check_pooled.py [--out pooled.json]   (one CUDA GPU; exit 1 on a FAIL)
    python3 tests/kernels/gpu_check_pooled.py --smoke               (tiny sizes on the CPU: references)

Prints one JSON object: per case, relative L2 against the float64 pooled softmax (PASS under
BOUND: bf16 inputs and output), the same for plain block-sparse attention against exact dense
attention (how much the remainder recovers), and median ms of both (GPU only: the remainder is
separate ATen ops, not inside the kernel, so its time is what those ops cost). Not collected by
pytest (tests/core/test_pooled.py checks the same math on the CPU; tests/kernels/test_gpu_check_pooled.py
runs --smoke).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from vsopt.core import semantics
from vsopt.core.plan import Quant

BOUND = {"none": 2e-2, "int8": 6e-2}


def dense_pooled_reference(q, k, v, masks, scale: float, block_m: int, block_n: int) -> torch.Tensor:
    """The pooled softmax in float64, vectorized: per query row the kept blocks' tokens and one
    pooled key (block mean, score + log of its size) per dropped block, in one softmax."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    nq, nk = q.shape[2], k.shape[2]
    kb = -(-nk // block_n)
    pad = kb * block_n - nk
    sizes = torch.full((kb,), float(block_n), dtype=torch.float64, device=q.device)
    sizes[-1] = nk - (kb - 1) * block_n
    kbar = torch.nn.functional.pad(k, (0, 0, 0, pad)).unflatten(2, (kb, block_n)).sum(3) / sizes[:, None]
    vbar = torch.nn.functional.pad(v, (0, 0, 0, pad)).unflatten(2, (kb, block_n)).sum(3) / sizes[:, None]
    rows = masks.repeat_interleave(block_m, 2)[:, :, :nq]                       # (Bm, H, Nq, KB) kept
    tok = rows.repeat_interleave(block_n, 3)[..., :nk]                           # (Bm, H, Nq, Nk)
    s_tok = (q @ k.transpose(2, 3) * scale).masked_fill(~tok, float("-inf"))
    s_pool = (q @ kbar.transpose(2, 3) * scale + sizes.log()).masked_fill(rows, float("-inf"))
    w = torch.softmax(torch.cat([s_tok, s_pool], -1), -1)
    return w[..., :nk] @ v + w[..., nk:] @ vbar


def _case(name, B, H, N, D, block, density, quant, device, dtype, timing):
    g = torch.Generator(device="cpu").manual_seed(N + H)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype) for _ in range(3))
    qb = kb = -(-N // block)
    masks = torch.rand(1, H, qb, kb, generator=g) < density
    masks |= torch.eye(qb, kb, dtype=torch.bool)                                # the diagonal, as dynamic heads
    masks = masks.to(device)
    scale = D ** -0.5
    got = semantics.pooled_masked_attention(q, k, v, masks, scale, Quant(quant), block, block)
    want = dense_pooled_reference(q, k, v, masks, scale, block, block)
    rel = float((got.double() - want).norm() / want.norm())
    plain = semantics.masked_attention(q, k, v, masks, scale, Quant(quant), block, block)
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    out = {"case": name, "B": B, "H": H, "N": N, "D": D, "block": block, "quant": quant,
           "kept_density": float(masks.float().mean()), "rel_l2_vs_pooled_softmax": rel,
           "pooled_rel_l2_vs_exact": float((got.double() - exact).norm() / exact.norm()),
           "plain_rel_l2_vs_exact": float((plain.double() - exact).norm() / exact.norm()),
           "pass": rel < BOUND[quant]}
    if timing:
        from vsopt.core.timing import median_ms

        out["pooled_ms"] = median_ms(lambda: semantics.pooled_masked_attention(q, k, v, masks, scale, Quant(quant),
                                                                               block, block), 20, warmup=3, cuda=True)
        out["plain_ms"] = median_ms(lambda: semantics.masked_attention(q, k, v, masks, scale, Quant(quant), block,
                                                                       block), 20, warmup=3, cuda=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the references)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        device, dtype, timing = "cpu", torch.float32, False
        cases = [("smoke", 1, 2, 100, 16, 16, 0.3, "none"), ("smoke-int8", 1, 2, 96, 16, 32, 0.3, "int8")]
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: run with --smoke for the CPU path", file=sys.stderr)
            return 2
        device, dtype, timing = "cuda", torch.bfloat16, True
        cases = [(f"wan-{n}-d{d}-{q}", 1, 12, n, d, 64, dens, q)
                 for n in (4680, 9360) for d in (128,) for dens in (0.2, 0.3) for q in ("none", "int8")]
    results = [_case(*c, device, dtype, timing) for c in cases]
    doc = {"check": "pooled_remainder", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "bound": BOUND, "results": results}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        from vsopt.core.io import atomic_write_bytes

        atomic_write_bytes(args.out, (text + "\n").encode())
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
