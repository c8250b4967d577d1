"""GPU check of the softmax-mass correction (Re-ttention, vsopt.core.rettention) at Wan-like sizes:
the measuring step (kept and complement blocks through the Triton kernel with lse, merged) and the
correcting step (kept blocks through the kernel, rho o + r after it) against their float64
definition, without host synchronization, and their time beside plain block-sparse attention and
dense SDPA; then the compiled measuring/correcting graphs under CUDA graphs (the pytest case
tests/e2e/test_rettention_steps.py::test_renorm_under_cuda_graphs_on_the_gpu_replays_what_runs_without_them).

    python3 tests/kernels/gpu_check_rettention.py [--out rettention.json]   (one CUDA GPU; exit 1 on a FAIL)
    python3 tests/kernels/gpu_check_rettention.py --smoke                   (tiny sizes on the CPU: references)

Prints one JSON object: per case, relative L2 of the corrected output against the float64
definition (statistics from a step whose inputs differ by 10% noise) and of the measuring output
against exact attention (PASS under BOUND, bf16), the same errors of plain block-sparse attention
(what the correction recovers), `no_host_sync` (both steps under
torch.cuda.set_sync_debug_mode("error")), median ms of plain / correcting / measuring / dense. Not
collected by pytest (tests/kernels/test_gpu_check_rettention.py runs --smoke).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from vsopt.core.lse import EagerEmitter, sparse_partial
from vsopt.core.rettention import correct, measure, reference_renorm
from vsopt.core.timing import median_ms

BOUND = {"none": 2e-2, "int8": 6e-2}
REF_HEADS = 2   # the float64 reference on the first heads only (memory: N^2 per head)


def _steps(q, k, v, masks, scale, block, quant):
    """The two steps as the lowered graphs run them, on precomputed tables (graph constants)."""
    em = EagerEmitter(q.device)
    idx, counts = torch.ops.vsopt.mask_to_table(masks)
    didx, dcounts = torch.ops.vsopt.mask_to_table(~masks)

    def measuring():
        kept = sparse_partial(em, q, k, v, idx, counts, scale, block, block, quant)
        dropped = sparse_partial(em, q, k, v, didx, dcounts, scale, block, block, quant)
        return measure(em, kept, dropped)

    def correcting(rho, resid):
        o = torch.ops.vsopt.block_sparse_attention(q, k, v, idx, counts, scale, block, block, quant)
        return correct(em, o, rho, resid)

    def plain():
        return torch.ops.vsopt.block_sparse_attention(q, k, v, idx, counts, scale, block, block, quant)

    return measuring, correcting, plain


def _median_ms(fn, iters=20):
    return median_ms(fn, iters, warmup=3)


def _case(name, B, H, N, D, block, density, quant, device, dtype, timing):
    g = torch.Generator(device="cpu").manual_seed(N + H)
    m_qkv = [torch.randn(B, H, N, D, generator=g) for _ in range(3)]
    c_qkv = [x + 0.1 * torch.randn(x.shape, generator=g) for x in m_qkv]   # a later step's inputs
    m_qkv, c_qkv = ([x.to(device, dtype) for x in t] for t in (m_qkv, c_qkv))
    qb = -(-N // block)
    masks = torch.rand(1, H, qb, qb, generator=g) < density
    masks |= torch.eye(qb, dtype=torch.bool)
    masks = masks.to(device)
    scale = D ** -0.5
    measuring, _, _ = _steps(*m_qkv, masks, scale, block, quant)
    out_m, rho, resid = measuring()
    _, correcting, plain = _steps(*c_qkv, masks, scale, block, quant)
    got = correcting(rho, resid.to(dtype))
    h = slice(0, min(H, REF_HEADS))
    want = reference_renorm(tuple(x[:, h] for x in m_qkv), tuple(x[:, h] for x in c_qkv), masks[:, h], scale,
                            block, block)
    exact_c = torch.nn.functional.scaled_dot_product_attention(*(x[:, h].double() for x in c_qkv), scale=scale)
    exact_m = torch.nn.functional.scaled_dot_product_attention(*(x[:, h].double() for x in m_qkv), scale=scale)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    row = {"case": name, "B": B, "H": H, "N": N, "D": D, "block": block, "density": density, "quant": quant,
           "dtype": str(dtype).replace("torch.", ""),
           "corrected_rel_l2_vs_definition": rel(got[:, h], want),
           "measuring_rel_l2_vs_exact": rel(out_m[:, h], exact_m),
           "corrected_rel_l2_vs_exact": rel(got[:, h], exact_c),
           "plain_rel_l2_vs_exact": rel(plain()[:, h], exact_c)}
    row["pass"] = row["corrected_rel_l2_vs_definition"] < BOUND[quant] and row["measuring_rel_l2_vs_exact"] < BOUND[quant]
    if device == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            measuring()
            correcting(rho, resid.to(dtype))
            row["no_host_sync"] = True
        except RuntimeError as e:
            row["no_host_sync"] = False
            row["sync_error"] = str(e).splitlines()[0][:200]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        row["pass"] = row["pass"] and row["no_host_sync"]
    if timing:
        r16 = resid.to(dtype)
        row["ms"] = {"plain": _median_ms(plain), "correcting": _median_ms(lambda: correcting(rho, r16)),
                     "measuring": _median_ms(measuring),
                     "dense_sdpa": _median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                         *c_qkv, scale=scale))}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the references): the script's path")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph pytest case")
    args = p.parse_args(argv)
    if args.smoke:
        cases = [("smoke", 1, 2, 96, 16, 16, 0.3, "none", "cpu", torch.float32, False),
                 ("smoke_int8", 1, 2, 80, 16, 16, 0.4, "int8", "cpu", torch.float32, False)]
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        cases = [("n4096_d64", 1, 12, 4096, 64, 64, 0.3, "none", "cuda", torch.bfloat16, True),
                 ("n4096_d64_int8", 1, 12, 4096, 64, 64, 0.3, "int8", "cuda", torch.bfloat16, True),
                 ("wan_n16384_d128", 1, 12, 16384, 128, 64, 0.2, "none", "cuda", torch.bfloat16, True)]
    doc = {"device": torch.cuda.get_device_name() if not args.smoke else "cpu", "bound": BOUND, "results": []}
    for c in cases:
        with torch.no_grad():
            doc["results"].append(_case(*c))
    ok = all(r["pass"] for r in doc["results"])
    if not args.smoke and not args.no_graphs:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               "tests/e2e/test_rettention_steps.py", "-k", "cuda_graphs"],
                              capture_output=True, text=True)
        doc["cuda_graphs_pytest"] = {"rc": proc.returncode, "tail": proc.stdout[-1500:] + proc.stderr[-1500:]}
        ok = ok and proc.returncode == 0
    doc["pass"] = ok
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
