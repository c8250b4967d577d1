"""Compile the Gluon block-sparse kernel ahead of time for sm_90a, without a GPU (Triton bundles ptxas).

Run it with the Triton the GPU machine has (3.6.0; Gluon's API differs between Triton versions):
    python tests/kernels/aot_gluon.py [--dump DIR]
It loads kernels/block_sparse/gluon_kernel.py by path (no torch needed) and compiles every variant the
launcher can pick (head dim 64/128, key block 64/128, stages, PIPELINE, PINGPONG, EVEN_N, WRITE_LSE),
printing registers, spills and shared memory of each, and exits non-zero if one fails.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import pathlib
import sys
import traceback

import triton
from triton.backends.compiler import GPUTarget

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_kernel_module():
    spec = importlib.util.spec_from_file_location("gluon_kernel", ROOT / "kernels/block_sparse/gluon_kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def signature(dtype: str) -> dict[str, str]:
    sig = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Out": f"*{dtype}", "Lse": "*fp32",
           "KvIndices": "*i32", "KvCounts": "*i32", "RowOrder": "*i32"}
    for name in ("stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
                 "stride_vb", "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_on",
                 "stride_ib", "stride_ih", "stride_im", "stride_cb", "stride_ch",
                 "H", "GROUP", "NQ", "NK", "QB"):
        sig[name] = "i32"
    sig["qk_scale_log2"] = "fp32"
    return sig


def compile_variant(fn, dtype, head_dim, block_n, stages, pipeline, pingpong, even_n, write_lse, dump=None):
    from triton.experimental.gluon._runtime import GluonASTSource

    num_warps = 4 if pingpong else 8
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": 128, "BLOCK_N": block_n, "STAGES": stages, "EVEN_N": even_n,
                  "WRITE_LSE": write_lse, "PIPELINE": pipeline, "PINGPONG": pingpong, "num_warps": num_warps}
    sig = signature(dtype)
    for name in constexprs:
        sig[name] = "constexpr"
    src = GluonASTSource(fn, sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "maxnreg": 168})
    if dump:
        out = pathlib.Path(dump)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"d{head_dim}_n{block_n}_s{stages}_p{int(pipeline)}_pp{int(pingpong)}_e{int(even_n)}_l{int(write_lse)}"
        for ext in ("ttgir", "ptx"):
            (out / f"{tag}.{ext}").write_text(compiled.asm[ext])
    meta = compiled.metadata
    return {"shared": meta.shared, "num_warps": meta.num_warps, "n_regs": getattr(compiled, "n_regs", None),
            "n_spills": getattr(compiled, "n_spills", None)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", default=None, help="write ttgir/ptx of each variant here")
    parser.add_argument("--quick", action="store_true", help="one variant per head dim")
    args = parser.parse_args()
    print("triton", triton.__version__)
    fn = load_kernel_module().gluon_block_sparse_fwd_kernel
    failures = 0
    grid = itertools.product(["bf16"], [128, 64], [128, 64], [2, 3], [True, False], [False, True], [True, False],
                             [False, True])
    for dtype, d, bn, stages, pipeline, pingpong, even_n, lse in grid:
        if args.quick and not (bn == 128 and stages == 2 and even_n and not lse):
            continue
        name = f"{dtype} d={d} bn={bn} stages={stages} pipeline={pipeline} pingpong={pingpong} even_n={even_n} lse={lse}"
        try:
            info = compile_variant(fn, dtype, d, bn, stages, pipeline, pingpong, even_n, lse, args.dump)
            print("ok  ", name, info, flush=True)
        except Exception as e:  # report every failing variant, then fail
            failures += 1
            print("FAIL", name, type(e).__name__, str(e).splitlines()[0] if str(e) else "", flush=True)
            if failures == 1:
                traceback.print_exc()
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
