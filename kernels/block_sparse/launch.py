"""Launcher of the block-sparse attention kernel: validation, quantization, work order, autotuning.

block_sparse_attention(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, quant, with_lse)
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) with Hq % Hkv == 0, head dim contiguous; fp16/bf16
    (float32 too: the interpreter tests use it; on a GPU its dots run as tf32). bfloat16 in Triton's
    interpreter only where its tl.dot is right, or in the 8-bit P V modes (kernel_spec; docs/KERNELS.md).
    kv_indices int32 (Bt, Hq, ceil(Nq/block_m), MAXK), kv_counts int32 (Bt, Hq, ceil(Nq/block_m)),
    Bt in {1, B}; indices ascending and < ceil(Nk/block_n) (not checked here: that needs a sync).
    Returns (out (B, Hq, Nq, D) in q's dtype and memory layout (torch.empty_like(q)), lse float32
    (B, Hq, Nq) or None).

Validation runs once per call. block_sparse_attention (the direct entry) runs inputs.check_inputs,
the checks it shares with the reference and the fake op, then run_checked; the op
(vsopt.core.ops) runs check_inputs itself, to choose between the kernel and the reference, and
then calls run_checked, which checks only what the kernel alone needs (dtype, head_dim, strides,
scale) while it builds the call's KernelSpec (kernels/spec.py). The spec fixes the kernel's
constexprs (spec_constexprs: the precision enters as QuantMode.code, the kernel derives its
QK_INT8 / PV_FP8 flags from it), the autotuner's key (those constexprs, plus the argument dtypes
Triton adds) and the tiles the autotuner tries (candidate_tiles).

Eager calls on real tensors launch the Triton objects themselves, traced calls go through
torch.library.wrap_triton (runtime.triton_launcher): through wrap_triton, an eager call outside
the op rebuilt the pruned autotuner on every call and benchmarked again (540 ms instead of 1.4 ms
at wan480); the autotuner object below, and its cache, are the one every eager call uses.

Work order (schedule.work_order): heads in order, each head's query-block rows longest first (a stable
sort, so equal counts keep their natural order): the longest rows start early, the short ones fill
the tail, and the programs running together share one head's K/V in L2. A global longest-first
order balances as well but mixes heads: 19-30% slower on an H100 (tune_attention.py, order study).
Tile shape: autotuned per (head_dim, table block, quant mode) over a pruned config list; the
kernel tile divides the table block (a 128x128 table block can run as 128x64 tiles). For 128x128
table blocks at head_dim 64 and 128 the list is the one measured best on an H100
(benchmarks/tune_attention.py, benchmarks/results/tune_attention_h100.json).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import triton

from ..errors import check
from ..quant import launch as quant_launch
from ..quant.fusable import quantize_qkv_fusable
from ..runtime import interpreter_bf16_dot_ok, interpreting, plain_eager, triton_launcher
from ..spec import KernelSpec, QuantMode
from . import kernel
from .inputs import check_inputs
from .schedule import checked_row_order, ensure_tma_allocator, work_order

#: The kernel's constexprs a KernelSpec fixes (see spec_constexprs); the autotuner keys by them.
SPEC_CONSTEXPRS = ("HEAD_DIM", "TABLE_BLOCK_M", "TABLE_BLOCK_N", "QUANT", "SOFTCAP")
LOG2E = math.log2(math.e)
#: Under torch.compile, quantize q, k, v with torch ops Inductor fuses into their producers (True) or
#: with the Triton quantization kernels (False). Off until the GPU has timed and checked the fused form
#: (tests/kernels/gpu_check.py --parts overhead times both): it is tested on the CPU only.
FUSE_QUANT_WHEN_TRACED = False
#: The INT8 products' integer <-> float conversions by the float-bias trick (kernel.py, FAST_CVT) or
#: by cvt instructions (False): a switch for timing one against the other on the GPU.
FAST_CVT = True
#: The quantized modes' Q quantized in the attention kernel's prologue (kernel.py QUANT_Q) instead of by
#: a separate pass, and K with V quantized in one launch (quant/launch.quantize_kv) in the 8-bit P V
#: modes. Same codes and scales either way (tests/kernels/test_quant_in_kernel.py); what each saves is
#: measured by tests/kernels/gpu_check_quant_overhead.py.
QUANTIZE_Q_IN_KERNEL = False
FUSE_KV_QUANT = False
#: Q quantized in the launch of V's channel statistics (quant/launch.stats_and_q, 8-bit P V modes).
FUSE_Q_WITH_STATS = False
_MODE_OF_CODE = {mode.code: mode for mode in QuantMode}


def spec_constexprs(spec: KernelSpec) -> dict[str, int]:
    """The kernel's constexpr arguments of a spec (the input dtype reaches the kernel as the
    pointers' element types; the layout "bhnd" as the strides; the cap's value as softcap_log2)."""
    return dict(zip(SPEC_CONSTEXPRS, (spec.head_dim, spec.block_m, spec.block_n, spec.quant.code, spec.softcap > 0)))


def spec_of_launch(args: dict) -> KernelSpec:
    """The spec of a launch from its arguments by name (the autotuner's pruner sees only those);
    Out has the input dtype (Q may hold quantized codes)."""
    softcap = float(args["softcap_log2"]) / LOG2E if args.get("SOFTCAP") else 0.0
    return KernelSpec(args["HEAD_DIM"], args["Out"].dtype, _MODE_OF_CODE[args["QUANT"]],
                      args["TABLE_BLOCK_M"], args["TABLE_BLOCK_N"], softcap=softcap)


@dataclasses.dataclass(frozen=True)
class Tile:
    """One kernel configuration. block_m/block_n must divide the table block; use_tma: K and V
    through tensor descriptors (see kernel.py). Passing one to block_sparse_attention skips
    autotuning (tests, tuning sweeps)."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    use_tma: bool = False

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "USE_TMA": self.use_tma}

    def launch_args(self) -> dict:
        return {**self.meta(), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def config(self) -> triton.Config:
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)


# Measured best on an H100 for 128x128 table blocks (tune_attention_h100.json): TMA loads; at
# head_dim 128, 128x128 tiles with 8 warps for bf16 and 128x128 / 128x64 / 64x128 with 4 warps for
# the quantized modes; at head_dim 64, 128x128 and 64x128 tiles with 4 warps.
_TUNED = {
    128: [Tile(128, 128, 8, 3, True), Tile(128, 128, 4, 3, True), Tile(128, 64, 4, 3, True), Tile(64, 128, 4, 3, True)],
    64: [Tile(128, 128, 4, 3, True), Tile(64, 128, 4, 3, True), Tile(128, 128, 4, 3, False), Tile(128, 64, 4, 3, True)],
}
# Other table blocks and head dims: best guesses first; the pruner keeps those that fit the table
# block. The interpreter (CPU tests) runs only the first that fits (pointer loads: the TMA path has
# its own tests).
_GENERIC = [
    Tile(128, 128, 8, 3), Tile(128, 64, 4, 3), Tile(128, 128, 8, 4), Tile(128, 64, 8, 4), Tile(64, 64, 4, 3),
    Tile(128, 32, 4, 3), Tile(64, 32, 4, 2), Tile(32, 32, 4, 2), Tile(32, 16, 2, 2), Tile(16, 16, 2, 1),
]
_ALL_TILES = list(dict.fromkeys([*_GENERIC, *(t for tiles in _TUNED.values() for t in tiles)]))


def all_tiles() -> list[Tile]:
    """Every tile the autotuner may run (its config list, without repeats), in that order: what an
    ahead-of-time build (plugins/tensorrt/ptx.py) compiles to cover any launch. A new list."""
    return list(_ALL_TILES)


def _tma_compatible(x: torch.Tensor, row_stride: int) -> bool:
    """TMA needs a 16-byte aligned base and row stride (true for any (B, H, N, D) view of a
    contiguous projection with head_dim >= 16; a view at an odd element offset is not)."""
    if torch._subclasses.fake_tensor.is_fake(x):
        # Tracing (torch.compile prunes configs on fake tensors): Inductor's buffers are 16-byte
        # aligned and it copies graph inputs that are not, so only the stride can be checked.
        return (row_stride * x.element_size()) % 16 == 0
    return x.data_ptr() % 16 == 0 and (row_stride * x.element_size()) % 16 == 0


def candidate_tiles(spec: KernelSpec, tma_ok: bool) -> list[Tile]:
    """The tiles the autotuner tries for a spec (tma_ok: K and V can be read through TMA)."""
    tm, tn, d = spec.block_m, spec.block_n, spec.head_dim
    if not interpreting() and (tm, tn) == (128, 128) and d in _TUNED:
        return [t for t in _TUNED[d] if tma_ok or not t.use_tma]
    # Tiles that divide the table block and are not much smaller than it (small tiles waste the MMA).
    fits = [t for t in _GENERIC
            if tm % t.block_m == 0 and tn % t.block_n == 0 and t.block_m >= min(tm, 64) and t.block_n >= min(tn, 32)]
    if not fits:  # tiny table blocks: the table block itself
        fits = [Tile(tm, tn)]
    return fits[:1] if interpreting() else fits[:4]


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    by_tile = dict(zip(_ALL_TILES, configs))
    tma_ok = _tma_compatible(args["K"], args["stride_kn"]) and \
        _tma_compatible(args["V"], max(args["stride_vn"], args["stride_vd"]))   # V's row stride: the one not 1
    return [by_tile[t] if t in by_tile else t.config() for t in candidate_tiles(spec_of_launch(args), tma_ok)]


_tuned_kernel = triton.autotune(
    configs=[t.config() for t in _ALL_TILES],
    key=[*SPEC_CONSTEXPRS, "EVEN_N", "WRITE_LSE", "PV_INT8", "FAST_CVT", "QUANT_Q"],
    prune_configs_by={"early_config_prune": _prune},
)(kernel.block_sparse_fwd_kernel)


KERNELS = ("triton", "gluon")


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                           kv_counts: torch.Tensor, scale: float, block_m: int, block_n: int,
                           quant: QuantMode | str = "none", with_lse: bool = False, tile: Tile | tuple | None = None,
                           softcap: float = 0.0, pv_format: str | None = None, kernel: str = "triton"
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the Triton kernel (see the module docstring for shapes), validating the inputs first.
    tile (a Tile, or the tuple of its fields) skips autotuning and runs that configuration: for
    tests and sweeps. softcap > 0: scores -> softcap * tanh(scores / softcap) before the softmax.
    pv_format "int8" with fp8 / int8_fp8 (experimental: no op, plan or export carries it): P and V in
    INT8 instead of e4m3 (kernel.py, PV_INT8; docs/KERNELS.md "P V formats"); int8_int8 is the plan
    mode of INT8 Q K with INT8 P V (its pv_format is "int8" already).
    kernel: "triton" (this module's kernel, every mode) or "gluon" (gluon_launch: Hopper, bf16/fp16,
    no cap, eager; its limits are errors, not fallbacks). The ops of vsopt.core choose between the two
    by route.py."""
    check(kernel in KERNELS, f"block_sparse_attention: kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "gluon":
        from . import gluon_launch

        check(tile is None and pv_format is None,
              "block_sparse_attention: tile and pv_format are Triton kernel options (kernel='triton')")
        return gluon_launch.block_sparse_attention_gluon(q, k, v, kv_indices, kv_counts, scale, block_m, block_n,
                                                         with_lse=with_lse, quant=quant, softcap=softcap)
    mode = check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, quant, softcap)
    return run_checked(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, mode, with_lse, tile, softcap,
                       pv_format)


def kernel_spec(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block_m: int, block_n: int,
                quant: QuantMode | str, softcap: float = 0.0) -> KernelSpec:
    """The spec of a call whose inputs passed check_inputs, after the checks only the kernel needs."""
    check(q.dtype in (torch.float16, torch.bfloat16, torch.float32),
          f"block_sparse_attention: dtype must be float16, bfloat16 or float32, got {q.dtype}")
    D = q.shape[-1]
    check(D in (16, 32, 64, 128), f"block_sparse_attention: the kernel supports head_dim 16, 32, 64, 128, got {D}")
    check(q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1,
          "block_sparse_attention: the head dimension of q, k, v must be contiguous (stride 1)")
    check(scale > 0, f"block_sparse_attention: scale must be positive, got {scale}")
    spec = KernelSpec(int(D), q.dtype, quant, int(block_m), int(block_n), softcap=float(softcap))
    # none and int8 multiply bfloat16 operands (q k^T, p v), which the interpreter may get wrong:
    # an error, not a silently wrong output (the 8-bit P V modes' dots take int8 / fp8 codes).
    check(not (interpreting() and q.dtype == torch.bfloat16 and not spec.quant.pv_is_8bit)
          or interpreter_bf16_dot_ok(),
          f"block_sparse_attention: Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) computes tl.dot "
          f"on bfloat16 operands wrongly (triton-lang/triton#11584) and quant {spec.quant.value!r} has bfloat16 "
          f"dots: in the interpreter use float16 or float32 inputs (or an 8-bit P V mode), or run on a GPU")
    check(spec.quant is QuantMode.NONE or q.dtype != torch.float32 or interpreting() or q.device.type == "cpu",
          "block_sparse_attention: quantized modes take float16/bfloat16 inputs")
    return spec


def run_checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                kv_counts: torch.Tensor, scale: float, block_m: int, block_n: int, quant: QuantMode,
                with_lse: bool = False, tile: Tile | tuple | None = None, softcap: float = 0.0,
                pv_format: str | None = None, row_order: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """block_sparse_attention on inputs check_inputs has accepted (quant: the mode it returned):
    the op's entry, which validated them itself. row_order: the work order (schedule.work_order of
    this table and batch) computed ahead, e.g. a compiled graph's constant for a static table;
    None: computed here (in a traced graph, a sort at every call)."""
    spec = kernel_spec(q, k, v, scale, block_m, block_n, quant, softcap)
    pv_format = quant_launch.check_pv_format(spec.quant, pv_format)
    eager = plain_eager(q, k, v, kv_indices, kv_counts)
    # The output takes q's memory layout: for the (B, N, H, D) views of a projection, the model's
    # transpose back to (B, N, H * D) is then free (a contiguous output cost a 100 MB copy per
    # layer at Wan 480p). ops._bsa_fake gives the same strides.
    out = torch.empty_like(q)
    quantized = q_bias = None
    if spec.quant is not QuantMode.NONE:
        # Traced (torch.compile): the quantization as torch ops Inductor fuses into the producers of
        # q, k, v (kernels/quant/fusable.py); eager: the Triton quantization kernels.
        if eager or not FUSE_QUANT_WHEN_TRACED:
            quantized = quant_launch.quantize_qkv(q, k, v, spec.quant, block_m, block_n, pv_format,
                                                  fuse_kv=FUSE_KV_QUANT, q_in_kernel=QUANTIZE_Q_IN_KERNEL,
                                                  q_with_stats=FUSE_Q_WITH_STATS)
        else:
            quantized = quantize_qkv_fusable(q, k, v, spec.quant, block_m, block_n, pv_format)
        if spec.softcap > 0:   # q . k_mean: smoothing removed it, a soft cap does not ignore it
            mean = quantized.k_mean.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            q_bias = torch.einsum("bhnd,bhd->bhn", q.float(), mean).contiguous()
    return launch_prepared(spec, out, q, k, v, quantized, q_bias, kv_indices, kv_counts, scale, with_lse, tile,
                           pv_format, row_order, eager)


def launch_prepared(spec: KernelSpec, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    quantized: "quant_launch.QuantizedQKV | None", q_bias: torch.Tensor | None,
                    kv_indices: torch.Tensor, kv_counts: torch.Tensor, scale: float, with_lse: bool = False,
                    tile: Tile | tuple | None = None, pv_format: str | None = None,
                    row_order: torch.Tensor | None = None, eager: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention kernel's launch on inputs run_checked has prepared: q, k, v the 16-bit inputs
    (their shapes size the grid), quantized their codes and scales in a quantized spec (None in
    "none"). Split out so that a measurement can time the kernel on inputs quantized ahead
    (tests/kernels/gpu_check_quant_overhead.py): the quantization's share of the op."""
    block_m, block_n = spec.block_m, spec.block_n
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    kv_indices, kv_counts = kv_indices.contiguous(), kv_counts.contiguous()
    QB, KB = triton.cdiv(Nq, block_m), triton.cdiv(Nk, block_n)
    q_scale = k_scale = v_scale = None
    quant_q = quantized is not None and quantized.q_scale is None   # Q quantized in the kernel's prologue
    if quantized is not None:
        q, k, v = quantized.q, quantized.k, quantized.v
        q_scale, k_scale, v_scale = quantized.q_scale, quantized.k_scale, quantized.v_scale
    if pv_format is not None:   # v is (B, H, D, N_pad): token stride 1 (the kernel knows), channel stride N_pad
        stride_vn, stride_vd = 1, v.stride(2)
    else:
        stride_vn, stride_vd = v.stride(2), 1
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device) if with_lse else out
    order = work_order(kv_counts, B) if row_order is None else checked_row_order(row_order, B * Hq * QB, q.device)
    unused = order   # stands in for the scale pointers a mode does not read
    Bt = kv_counts.shape[0]
    grid = lambda meta: (order.numel() * (block_m // meta["BLOCK_M"]),)  # noqa: E731
    if tile is not None:
        tile = tile if isinstance(tile, Tile) else Tile(*tile)
        check(block_m % tile.block_m == 0 and block_n % tile.block_n == 0 and min(tile.block_m, tile.block_n) >= 16,
              f"block_sparse_attention: tile {tile} must divide the table block ({block_m}, {block_n})")
        check(not tile.use_tma or q.is_cuda or interpreting(),
              "block_sparse_attention: TMA loads need a CUDA GPU (or Triton's interpreter)")
        launch, tile_args = triton_launcher(kernel.block_sparse_fwd_kernel, eager), tile.launch_args()
    else:
        launch, tile_args = triton_launcher(_tuned_kernel, eager), {}
    if q.is_cuda or interpreting():
        ensure_tma_allocator()
    launch[grid](
        q, k, v, out, lse,
        q_scale if q_scale is not None else unused, k_scale if k_scale is not None else unused,
        v_scale if v_scale is not None else unused, q_bias if q_bias is not None else unused,
        kv_indices, kv_counts, order,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), stride_vn, stride_vd,
        out.stride(0), out.stride(1), out.stride(2),
        kv_indices.stride(0) if Bt > 1 else 0, kv_indices.stride(1), kv_indices.stride(2),
        kv_counts.stride(0) if Bt > 1 else 0, kv_counts.stride(1),
        Hq, Hq // Hkv, Nq, Nk, QB, KB, scale * LOG2E, spec.softcap * LOG2E,
        **spec_constexprs(spec), WRITE_LSE=with_lse, EVEN_N=Nk % block_n == 0, ROUND_IN_FP32=interpreting(),
        PV_INT8=pv_format == "int8", FAST_CVT=FAST_CVT, QUANT_Q=quant_q,
        **tile_args,
    )
    return out, (lse if with_lse else None)
