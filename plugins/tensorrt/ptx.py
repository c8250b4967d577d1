"""Ahead-of-time PTX of vsopt's block-sparse attention kernel for sm_90, without a GPU.

triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) lowers a kernel to PTX (and a
cubin, with the ptxas Triton ships) on any machine. Two kernels:

    attention   kernels/block_sparse/kernel.py as the launcher launches it (its argument order):
                one PTX per tile the launcher's autotuner may pick and per quant mode
    trt_entry   entry.py, the same kernel in TensorRT's AOT argument order (quant none, no TMA)

Compiles run in a child process with Triton's interpreter off: in a process that set
TRITON_INTERPRET=1 (the CPU tests) the kernels were decorated as interpreted functions, which
cannot be compiled.

    configs = launcher_configs(head_dim=128, dtype="bf16", quant="int8", block_m=128, block_n=128)
    index = compile_configs(configs, out_dir)     # out_dir/<name>.ptx, and metadata per name
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TARGET = ("cuda", 90, 32)
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_QUANT_CODE = {"none": 0, "int8": 1, "fp8": 2, "int8_fp8": 3, "int8_int8": 4}   # kernels/spec.py's QuantMode.code


@dataclass(frozen=True)
class PtxConfig:
    """One compiled form: the kernel, the KernelSpec fields it depends on, the tile, EVEN_N
    (Nk a multiple of the key block) and, for trt_entry, the folded softmax scale; softcap_log2:
    the logit soft cap in log2 units (cap * log2 e; 0: none), a constant of trt_entry, a run-time
    argument of attention (only whether it is > 0 is compiled in)."""

    kernel: str            # "attention" | "trt_entry"
    head_dim: int
    dtype: str             # bf16 | fp16 | fp32
    quant: str
    table_block_m: int
    table_block_n: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = False
    even_n: bool = True
    qk_scale_log2: float = 0.0
    softcap_log2: float = 0.0

    @property
    def name(self) -> str:
        s = (f"{self.kernel}_{self.dtype}_{self.quant}_d{self.head_dim}_t{self.table_block_m}x{self.table_block_n}"
             f"_b{self.block_m}x{self.block_n}_w{self.num_warps}s{self.num_stages}"
             f"{'_tma' if self.use_tma else ''}{'' if self.even_n else '_ragged'}")
        if self.softcap_log2 > 0:
            s += "_softcap" + (f"{self.softcap_log2:.6g}".replace(".", "p") if self.kernel == "trt_entry" else "")
        return s + (f"_scale{self.qk_scale_log2:.6g}".replace(".", "p") if self.kernel == "trt_entry" else "")


_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _tiles(head_dim: int, dtype: str, quant: str, block_m: int, block_n: int) -> list:
    """The tiles the launcher's autotuner may pick on a GPU for this spec (its own candidate list,
    with the interpreter off and TMA-aligned K/V)."""
    import torch

    from vsopt.kernels.block_sparse import launch
    from vsopt.kernels.spec import KernelSpec

    spec = KernelSpec(head_dim, getattr(torch, _TORCH_DTYPES[dtype]), quant, block_m, block_n)
    return launch.candidate_tiles(spec, tma_ok=True)


def launcher_configs(head_dim: int, dtype: str, quant: str, block_m: int, block_n: int,
                     even_n: bool = True) -> list[PtxConfig]:
    """Every attention-kernel form the launcher may run for this spec (runs in the child)."""
    return [PtxConfig("attention", head_dim, dtype, quant, block_m, block_n, t.block_m, t.block_n, t.num_warps,
                      t.num_stages, t.use_tma, even_n) for t in _tiles(head_dim, dtype, quant, block_m, block_n)]


def trt_entry_config(head_dim: int, dtype: str, block_m: int, block_n: int, even_n: bool,
                     qk_scale_log2: float, softcap_log2: float = 0.0) -> PtxConfig:
    """The TensorRT entry's form: the first non-TMA tile the launcher would consider."""
    tile = next((t for t in _tiles(head_dim, dtype, "none", block_m, block_n) if not t.use_tma), None)
    if tile is None:
        from vsopt.kernels.block_sparse import launch

        tile = launch.Tile(min(block_m, 64), min(block_n, 64), 4, 2)
    return PtxConfig("trt_entry", head_dim, dtype, "none", block_m, block_n, tile.block_m, tile.block_n, tile.num_warps,
                     tile.num_stages, False, even_n, float(qk_scale_log2), float(softcap_log2))


def representative_configs(dtype: str = "bf16") -> list[PtxConfig]:
    """The CI set (runs in the child): every tile of the launcher's list once (quant none, head_dim
    128, a 128x128 table block that every tile divides), every quant mode once at the launcher's
    first 128x128 choice for head_dim 64 and 128, a ragged key length, and the TensorRT entry."""
    from vsopt.kernels.block_sparse import launch

    out = [PtxConfig("attention", 128, dtype, "none", 128, 128, t.block_m, t.block_n, t.num_warps, t.num_stages,
                     t.use_tma) for t in launch.all_tiles()]
    for d in (64, 128):
        first = launcher_configs(d, dtype, "none", 128, 128)[0]
        out += [dataclasses.replace(first, quant=q) for q in ("int8", "fp8", "int8_fp8", "int8_int8")]
    out.append(dataclasses.replace(launcher_configs(64, dtype, "none", 64, 64)[0], even_n=False))
    out.append(trt_entry_config(64, dtype, 64, 64, True, 0.18033688011112042))
    out.append(trt_entry_config(64, dtype, 64, 64, True, 0.18033688011112042, 50.0 * 1.4426950408889634))
    out.append(dataclasses.replace(launcher_configs(128, dtype, "none", 128, 128)[0], quant="int8_fp8",
                                   softcap_log2=1.0))   # the cap compiled in (its value is an argument)
    return list(dict.fromkeys(out))


def _signature(c: PtxConfig) -> tuple[dict, dict]:
    from vsopt.kernels.block_sparse import kernel

    from .entry import SCALARS, block_sparse_trt_entry

    dt = c.dtype
    if c.kernel == "trt_entry":
        fn = block_sparse_trt_entry
        sig = {n: f"*{dt}" for n in ("Q", "K", "V")}
        sig.update({n: "*i32" for n in ("KvIndices", "KvCounts", "RowOrder")})
        sig.update({n: "i32" for n in SCALARS})
        sig["Out"] = f"*{dt}"
        const = {"QK_SCALE_LOG2": c.qk_scale_log2, "SOFTCAP_LOG2": c.softcap_log2, "SOFTCAP": c.softcap_log2 > 0,
                 "HEAD_DIM": c.head_dim, "TABLE_BLOCK_M": c.table_block_m,
                 "TABLE_BLOCK_N": c.table_block_n, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "EVEN_N": c.even_n}
    else:
        fn = kernel.block_sparse_fwd_kernel
        code = _QUANT_CODE[c.quant]
        qk = {0: dt, 1: "i8", 2: "fp8e4nv", 3: "i8", 4: "i8"}[code]
        v = "fp8e4nv" if code in (2, 3) else "i8" if code == 4 else dt
        ptrs = {"Q": qk, "K": qk, "V": v, "Out": dt, "Lse": dt, "QScale": "fp32" if code else "i32",
                "KScale": "fp32" if code else "i32", "VScale": "fp32" if code in (2, 3, 4) else "i32",
                "QkBias": "fp32" if code and c.softcap_log2 > 0 else "i32",
                "KvIndices": "i32", "KvCounts": "i32", "RowOrder": "i32"}
        const = {"HEAD_DIM": c.head_dim, "TABLE_BLOCK_M": c.table_block_m, "TABLE_BLOCK_N": c.table_block_n,
                 "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "QUANT": code, "WRITE_LSE": False, "EVEN_N": c.even_n,
                 "ROUND_IN_FP32": False, "USE_TMA": c.use_tma, "SOFTCAP": c.softcap_log2 > 0,
                 "PV_INT8": False,   # the launcher's experimental FP8-QK INT8 P V; int8_int8 is QUANT 4
                 "FAST_CVT": True,
                 "QUANT_Q": False}   # Q comes quantized (the launcher's option to quantize it in the kernel is off)
        sig = {}
        for name in fn.arg_names:
            sig[name] = f"*{ptrs[name]}" if name in ptrs else "constexpr" if name in const else \
                "fp32" if name in ("qk_scale_log2", "softcap_log2") else "i32"
    for name in const:
        sig[name] = "constexpr"
    return fn, sig, const


def _compile_one(c: PtxConfig) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, const = _signature(c)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget(*TARGET),
                              options={"num_warps": c.num_warps, "num_stages": c.num_stages})
    return {"ptx": compiled.asm["ptx"], "kernel_name": compiled.metadata.name, "shared": compiled.metadata.shared,
            "num_warps": compiled.metadata.num_warps}


def compile_configs(configs: list[PtxConfig] | str | dict, out_dir: str | os.PathLike, timeout: float = 1800) -> dict:
    """Compile `configs` to out_dir/<name>.ptx in a child process; returns {name: metadata}
    (kernel name, shared memory bytes, warps, the config). configs: PtxConfigs, "representative"
    (the CI set), or {"launcher": [launcher_configs kwargs], "trt_entry": [trt_entry_config kwargs]}
    (the forms of given specs, resolved in the child)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    request = configs if isinstance(configs, (str, dict)) else [dataclasses.asdict(c) for c in configs]
    (out_dir / "request.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "vsopt.plugins.tensorrt.ptx", str(out_dir)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    (out_dir / "request.json").unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        raise RuntimeError(f"PTX compilation failed: {lines[-1]}")
    return json.loads((out_dir / "index.json").read_text())


def _child(out_dir: Path) -> int:
    request = json.loads((out_dir / "request.json").read_text())
    if request == "representative":
        configs = representative_configs()
    elif isinstance(request, dict):   # {"launcher": [spec kwargs...], "trt_entry": [...]}
        configs = [c for spec in request.get("launcher", []) for c in launcher_configs(**spec)]
        configs += [trt_entry_config(**spec) for spec in request.get("trt_entry", [])]
    else:
        configs = [PtxConfig(**c) for c in request]
    index = {}
    for c in dict.fromkeys(configs):
        meta = _compile_one(c)
        (out_dir / f"{c.name}.ptx").write_text(meta.pop("ptx"))
        index[c.name] = {**meta, "config": dataclasses.asdict(c), "target": list(TARGET)}
    (out_dir / "index.json").write_text(json.dumps(index, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1])))
