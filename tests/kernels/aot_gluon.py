"""Compile the Gluon block-sparse kernel ahead of time for sm_90a, without a GPU (Triton bundles ptxas).

Run it with the Triton the GPU machine has (3.6.0; Gluon's API differs between Triton versions):
    python tests/kernels/aot_gluon.py [--dump DIR]
It loads kernels/block_sparse/gluon_kernel.py by path (no torch needed) and compiles every variant the
launcher can pick (head dim 64/128, key block 64/128, stages, PIPELINE, PINGPONG, ORDERED, persistent,
EVEN_N, WRITE_LSE), printing the shared memory of each, and exits non-zero if one fails.

    python tests/kernels/aot_gluon.py --launcher     (needs torch too, a CPU build is enough)
compiles instead the launches gluon_launch.launch_validated makes for CPU tensors of several shapes and
layouts (arguments, constexprs, host TMA descriptors exactly as they reach the kernels on a GPU), through
Triton's own binder: the launcher-to-kernel interface checked without a GPU.
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


def persistent_signature(dtype: str, head_dim: int, block_n: int) -> dict[str, str]:
    from triton.experimental.gluon import language as gl

    gl_dtype = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    sig = {}
    for name, rows in (("q_desc", 128), ("k_desc", block_n), ("v_desc", block_n)):
        layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl_dtype)
        sig[name] = f"tensordesc<{dtype}[{rows}, {head_dim}],{layout!r}>"
    sig.update({"Out": f"*{dtype}", "Lse": "*fp32", "KvIndices": "*i32", "KvCounts": "*i32", "RowOrder": "*i32"})
    for name in ("stride_ob", "stride_oh", "stride_on", "stride_ib", "stride_ih", "stride_im", "stride_cb",
                 "stride_ch", "H", "GROUP", "NQ", "NK", "QB", "n_rows", "q_rb", "q_rh", "q_ch", "kv_rb", "kv_rh",
                 "kv_ch"):
        sig[name] = "i32"
    sig["qk_scale_log2"] = "fp32"
    return sig


def compile_variant(module, dtype, head_dim, block_n, stages, pipeline, pingpong, even_n, write_lse, dump=None,
                    ordered=False, persistent=False):
    from triton.experimental.gluon._runtime import GluonASTSource

    num_warps = 4 if pingpong else 8
    constexprs = {"STAGES": stages, "EVEN_N": even_n, "WRITE_LSE": write_lse, "PIPELINE": pipeline,
                  "PINGPONG": pingpong, "ORDERED": ordered, "CONSUMER_REGS": 240, "num_warps": num_warps}
    if persistent:
        fn = module.gluon_block_sparse_persistent_kernel
        sig = persistent_signature(dtype, head_dim, block_n)
    else:
        fn = module.gluon_block_sparse_fwd_kernel
        constexprs.update({"HEAD_DIM": head_dim, "BLOCK_M": 128, "BLOCK_N": block_n})
        sig = signature(dtype)
    for name in constexprs:
        sig[name] = "constexpr"
    src = GluonASTSource(fn, sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "maxnreg": 168})
    if dump:
        out = pathlib.Path(dump)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"{'P' if persistent else ''}d{head_dim}_n{block_n}_s{stages}_p{int(pipeline)}_pp{int(pingpong)}" \
              f"{'o' if ordered else ''}_e{int(even_n)}_l{int(write_lse)}"
        for ext in ("ttgir", "ptx"):
            (out / f"{tag}.{ext}").write_text(compiled.asm[ext])
    meta = compiled.metadata
    return {"shared": meta.shared, "num_warps": meta.num_warps, "n_regs": getattr(compiled, "n_regs", None),
            "n_spills": getattr(compiled, "n_spills", None)}


def load_kernels_package():
    """kernels/ as a package (it imports nothing above itself), without installing vsopt."""
    spec = importlib.util.spec_from_file_location("aot_kernels", ROOT / "kernels/__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    package = importlib.util.module_from_spec(spec)
    sys.modules["aot_kernels"] = package
    spec.loader.exec_module(package)
    return package


class _Recorder:
    """Stands in for a @gluon.jit kernel: kernel[grid](*args, **kwargs) records the call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def compile_recorded(fn, args, kwargs):
    """What JITFunction.run does up to the compile, for target sm_90a instead of the current device."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    from triton.experimental.gluon._runtime import GluonASTSource

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, None)
    src = GluonASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def launcher_cases() -> int:
    import torch

    load_kernels_package()
    from aot_kernels.block_mask import reference as mask_ref
    from aot_kernels.block_sparse import gluon_kernel, gluon_launch

    class Kernels:
        gluon_block_sparse_fwd_kernel = _Recorder(gluon_kernel.gluon_block_sparse_fwd_kernel)
        gluon_block_sparse_persistent_kernel = _Recorder(gluon_kernel.gluon_block_sparse_persistent_kernel)

    failures = 0
    shapes = [(2, 8, 2, 1000, 64, 128, torch.bfloat16, 1, "bhnd"), (2, 4, 4, 777, 128, 64, torch.float16, 2, "bnhd"),
              (1, 12, 12, 32760, 128, 128, torch.bfloat16, 1, "bhnd"), (1, 4, 2, 1024, 64, 128, torch.bfloat16, 1,
                                                                         "strided")]
    for B, Hq, Hkv, N, D, bn, dtype, bt, layout in shapes:
        def make(h):
            if layout == "bnhd":
                return torch.zeros(B, N, h, D, dtype=dtype).transpose(1, 2)
            if layout == "strided":
                return torch.zeros(B, h, N, 2 * D, dtype=dtype)[..., :D]
            return torch.zeros(B, h, N, D, dtype=dtype)
        q, k, v = make(Hq), make(Hkv), make(Hkv)
        mask = torch.rand(bt, Hq, -(-N // 128), -(-N // bn)) < 0.3
        idx, cnt = mask_ref.mask_to_table(mask)
        for config in gluon_launch.CONFIGS:
            if gluon_launch.shared_bytes(D, bn, config.stages) > 227 * 1024:
                continue
            for with_lse in (False, True):
                name = f"launch {layout} B{B} Hq{Hq} Hkv{Hkv} N{N} D{D} 128x{bn} {dtype} Bt{bt} lse={with_lse} {config}"
                try:
                    kernels = Kernels()
                    kernels.gluon_block_sparse_fwd_kernel.calls.clear()
                    kernels.gluon_block_sparse_persistent_kernel.calls.clear()
                    gluon_launch.launch_validated(q, k, v, idx, cnt, D ** -0.5, 128, bn, with_lse, config, kernels,
                                                  num_sms=132)
                    rec = kernels.gluon_block_sparse_persistent_kernel if config.persistent \
                        else kernels.gluon_block_sparse_fwd_kernel
                    (grid, args, kwargs), = rec.calls
                    compiled = compile_recorded(rec.fn, args, kwargs)
                    print("ok  ", name, "grid", grid, "shared", compiled.metadata.shared, flush=True)
                except Exception as e:
                    failures += 1
                    print("FAIL", name, type(e).__name__, str(e).splitlines()[0] if str(e) else "", flush=True)
                    if failures == 1:
                        traceback.print_exc()
    print(f"{failures} failed")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", default=None, help="write ttgir/ptx of each variant here")
    parser.add_argument("--quick", action="store_true", help="one variant per head dim")
    parser.add_argument("--launcher", action="store_true", help="compile the launcher's own launches")
    args = parser.parse_args()
    print("triton", triton.__version__)
    if args.launcher:
        return launcher_cases()
    module = load_kernel_module()
    failures = 0
    variants = [(2, False, False, False), (2, True, False, False), (3, True, False, False), (4, True, False, False),
                (2, False, True, False), (3, False, True, False), (2, True, True, False), (3, True, True, False),
                (2, True, True, True), (3, True, True, True), (4, True, True, True)]   # (stages, pipeline, pingpong, ordered)
    grid = itertools.product([True, False], ["bf16"], [128, 64], [128, 64], variants, [False, True], [False, True])
    for persistent, dtype, d, bn, (stages, pipeline, pingpong, ordered), even_n, lse in grid:
        if (128 * d + 2 * stages * bn * d) * 2 > 227 * 1024:
            continue
        if args.quick and not (bn == 128 and not even_n and not lse):
            continue
        name = f"{'persistent' if persistent else 'per-row'} {dtype} d={d} bn={bn} stages={stages} " \
               f"pipeline={pipeline} pingpong={pingpong} ordered={ordered} even_n={even_n} lse={lse}"
        try:
            info = compile_variant(module, dtype, d, bn, stages, pipeline, pingpong, even_n, lse, args.dump, ordered,
                                   persistent)
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
