"""Launcher of the Gluon block-sparse kernel (gluon_kernel.py): validation, variant, launch.

block_sparse_attention_gluon(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, with_lse, config)
takes the arguments of launch.block_sparse_attention (shapes in its docstring) and returns the same
(out in q's dtype and memory layout, lse or None). What the Gluon kernel covers is narrower than the
Triton kernel's, and every limit is a clear error, never a silent fallback:
  - quant "none", no soft cap, float16/bfloat16, head_dim 64 or 128;
  - table blocks of 128 query rows and 64 or 128 keys;
  - a Hopper GPU (compute capability 9.0) and Triton 3.6's Gluon (the GPU machine's): TMA, mbarriers,
    wgmma and warp specialization, none of which Triton's interpreter runs (TRITON_INTERPRET=1);
  - q, k, v with a contiguous head dimension, 16-byte aligned base and row strides (TMA);
  - eager calls on real tensors (the kernel is not wrapped for torch.compile tracing: the ops reach it
    under torch.compile through an opaque op of their own, see route.py).
validate() runs every check that needs no GPU, so the CPU suite tests it.

GluonConfig picks the kernel's variant (see gluon_kernel.py): stages of the K/V ring, PIPELINE (QK of
entry t+1 overlapped with PV of entry t), PINGPONG (two one-warpgroup consumers), ORDERED (their GEMMs
in strict turns), persistent (one program per SM over the rows; host TMA descriptors over 2-D views of
q, k, v: a contiguous (B, H, N, D) tensor or a (B, N, H, D) view is used as it is, any other layout is
copied to a contiguous one first). default_config(head_dim) is the variant tests/kernels/gpu_check_gluon.py
measured fastest at that head dim (DEFAULT_CONFIGS; docs/KERNELS.md has the numbers).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import check
from ..runtime import interpreting, plain_eager
from ..spec import QuantMode
from .inputs import check_inputs
from .schedule import checked_row_order, ensure_tma_allocator, work_order

LOG2E = math.log2(math.e)
HEAD_DIMS = (64, 128)
BLOCK_NS = (64, 128)
TRITON_VERSION = "3.6"   # Gluon's API changes between Triton releases; the kernel is written for this one


@dataclasses.dataclass(frozen=True)
class GluonConfig:
    """stages: depth of the K/V ring; pipeline: QK of entry t+1 issued before PV of entry t; pingpong:
    two consumer partitions of one warpgroup each (else one of two); ordered: with pingpong and
    pipeline, the two issue their GEMMs in strict turns (FA3's ping-pong schedule); persistent: one
    program per SM looping over the table rows (gluon_block_sparse_persistent_kernel)."""
    stages: int = 2
    pipeline: bool = True
    pingpong: bool = False
    ordered: bool = False
    persistent: bool = False

    def launch_args(self) -> dict:
        # 12 warps in all (the consumers' two warpgroups + the producer's): 168 registers a thread fill
        # the register file; setmaxnreg moves them from the producer (24) to the consumers (240).
        return {"STAGES": self.stages, "PIPELINE": self.pipeline, "PINGPONG": self.pingpong,
                "ORDERED": self.ordered, "CONSUMER_REGS": 240, "num_warps": 4 if self.pingpong else 8,
                "maxnreg": 168}


#: The variant per head dim, the fastest of the second GPU run (H200, 2026-12-02 05:30 UTC,
#: gpu_check_gluon.py --parts speed, useful TFLOP/s at densities 0.1 / 0.2 / 0.5 / 1.0):
#:   128 (wan480): persistent, 3 stages, pipelined, ordered ping-pong 437 / 550 / 572 / 585 (the Triton
#:       kernel 381 / 449 / 482 / 485; the one-program-per-row ping-pong 451 / 524 / 549 / 533, the
#:       fastest at 0.1 only);
#:   64 (cog720): persistent, 2 stages, ping-pong 319 / 347 / 410 / 436 (the Triton kernel 326 / 343 /
#:       408 / 409: no variant clearly better, so route.py keeps the ops on the Triton kernel there).
DEFAULT_CONFIGS = {128: GluonConfig(3, True, True, True, persistent=True), 64: GluonConfig(2, False, True, persistent=True)}


def default_config(head_dim: int) -> GluonConfig:
    """The measured-fastest variant at a head dim (DEFAULT_CONFIGS)."""
    check(head_dim in DEFAULT_CONFIGS, f"block_sparse_attention (gluon): head_dim must be one of {HEAD_DIMS}, "
                                       f"got {head_dim}")
    return DEFAULT_CONFIGS[head_dim]


#: Every variant gpu_check_gluon.py compares (4 stages fit at head_dim 64 only). The first GPU run
#: (docs/KERNELS.md) made the one-program-per-row kernel with two one-warpgroup consumers and no
#: intra-warpgroup pipelining the fastest: it is the reference the persistent variants are measured against.
CONFIGS = (GluonConfig(2, False, True), GluonConfig(2, False, True, persistent=True),
           GluonConfig(3, False, True, persistent=True), GluonConfig(2, True, True, persistent=True),
           GluonConfig(2, True, True, True, persistent=True), GluonConfig(3, True, True, True, persistent=True),
           GluonConfig(2, True, False, persistent=True), GluonConfig(4, True, True, True, persistent=True))


def shared_bytes(head_dim: int, block_n: int, stages: int, itemsize: int = 2) -> int:
    """Shared memory of the kernel: the Q tile and the K/V ring (the barriers add a few bytes)."""
    return (128 * head_dim + 2 * stages * block_n * head_dim) * itemsize


def _tma_ok(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all((s * x.element_size()) % 16 == 0
                                                                 for s in x.stride()[:-1])


def validate(q, k, v, kv_indices, kv_counts, scale: float, block_m: int, block_n: int,
             quant: QuantMode | str = "none", softcap: float = 0.0, config: GluonConfig | None = None) -> None:
    """Every check of the Gluon path that needs no GPU (raises KernelInputError naming the problem);
    config None: default_config of the head dim."""
    mode = check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, quant, softcap)
    name = "block_sparse_attention (gluon)"
    check(mode is QuantMode.NONE, f"{name}: only quant 'none' (bf16/fp16) is implemented, got {mode.value!r}")
    check(softcap == 0, f"{name}: logit soft-capping is not implemented, got softcap={softcap}")
    check(q.dtype in (torch.float16, torch.bfloat16), f"{name}: dtype must be float16 or bfloat16, got {q.dtype}")
    check(q.shape[-1] in HEAD_DIMS, f"{name}: head_dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    check(block_m == 128 and block_n in BLOCK_NS,
          f"{name}: table blocks must be 128 x {' or '.join(map(str, BLOCK_NS))}, got {block_m} x {block_n}")
    check(scale > 0, f"{name}: scale must be positive, got {scale}")
    config = default_config(q.shape[-1]) if config is None else config
    check(isinstance(config, GluonConfig) and config.stages >= 1, f"{name}: config must be a GluonConfig, got {config!r}")
    check(not config.ordered or (config.pingpong and config.pipeline),
          f"{name}: ordered turns need pingpong and pipeline, got {config}")
    smem = shared_bytes(q.shape[-1], block_n, config.stages)
    check(smem <= 227 * 1024, f"{name}: {config.stages} stages need {smem} bytes of shared memory (> 227 KB)")
    check(not interpreting(), f"{name}: the Gluon kernel cannot run in Triton's interpreter (TRITON_INTERPRET=1: "
                              "no TMA, mbarrier, wgmma or warp specialization there); use the Triton kernel")
    for t_name, t in (("q", q), ("k", k), ("v", v)):
        check(_tma_ok(t), f"{name}: {t_name} must have a contiguous head dim and a 16-byte aligned base and strides "
                          f"(TMA), got strides {tuple(t.stride())}")
    check(q.is_cuda, f"{name}: needs a CUDA GPU (got tensors on {q.device})")


def _check_device(q: torch.Tensor) -> None:
    import triton

    name = "block_sparse_attention (gluon)"
    cap = torch.cuda.get_device_capability(q.device)
    check(cap == (9, 0), f"{name}: written for Hopper (sm_90a), got compute capability {cap}")
    check(triton.__version__.startswith(TRITON_VERSION),
          f"{name}: written for Triton {TRITON_VERSION}'s Gluon API, found Triton {triton.__version__}")


def block_sparse_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                                 kv_counts: torch.Tensor, scale: float, block_m: int, block_n: int,
                                 with_lse: bool = False, config: GluonConfig | None = None,
                                 quant: QuantMode | str = "none", softcap: float = 0.0, num_sms: int | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the Gluon kernel (module docstring: what it takes). config: the variant (default_config);
    num_sms: programs of the persistent kernel (default: the GPU's SMs; fewer make each program loop
    over more rows, as the GPU check does on small shapes)."""
    config = config or default_config(q.shape[-1])
    validate(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, quant, softcap, config)
    check(plain_eager(q, k, v, kv_indices, kv_counts),
          "block_sparse_attention (gluon): eager calls only (the Gluon kernel is not wrapped for tracing)")
    _check_device(q)
    check(num_sms is None or num_sms >= 1, f"block_sparse_attention (gluon): num_sms must be >= 1, got {num_sms}")
    return launch_validated(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, with_lse, config,
                            num_sms=num_sms)


def launch_validated(q, k, v, kv_indices, kv_counts, scale: float, block_m: int, block_n: int, with_lse: bool,
                     config: GluonConfig, kernels=None, num_sms: int | None = None,
                     row_order: torch.Tensor | None = None):
    """The launch itself, on inputs validate() accepted. kernels: the module holding the two Gluon
    kernels (gluon_kernel; tests/kernels/aot_gluon.py passes a recorder to compile the very launches
    this function makes for sm_90a without a GPU); num_sms: programs of the persistent kernel;
    row_order: the work order computed ahead (the op's row_order argument; None: work_order here)."""
    if kernels is None:
        from . import gluon_kernel as kernels
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    kv_indices, kv_counts = kv_indices.contiguous(), kv_counts.contiguous()
    Bt = kv_counts.shape[0]
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device) if with_lse else out
    order = work_order(kv_counts, B) if row_order is None else \
        checked_row_order(row_order, B * Hq * kv_counts.shape[2], q.device)
    table_args = (kv_indices.stride(0) if Bt > 1 else 0, kv_indices.stride(1), kv_indices.stride(2),
                  kv_counts.stride(0) if Bt > 1 else 0, kv_counts.stride(1))
    variant = {"EVEN_N": Nk % block_n == 0, "WRITE_LSE": with_lse, **config.launch_args()}
    if q.is_cuda:
        ensure_tma_allocator()   # the per-row kernel's producer builds its TMA descriptors on the device
    if config.persistent:
        q_desc, q_map = _descriptor(q, 128)
        if _flat(k)[1] != _flat(v)[1]:   # K and V share one row mapping: give them one layout
            k, v = k.contiguous(), v.contiguous()
        k_desc, kv_map = _descriptor(k, block_n)
        v_desc, _ = _descriptor(v, block_n)
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        grid = (max(1, min(order.numel(), num_sms)),)
        kernels.gluon_block_sparse_persistent_kernel[grid](
            q_desc, k_desc, v_desc, out, lse, kv_indices, kv_counts, order,
            out.stride(0), out.stride(1), out.stride(2), *table_args,
            Hq, Hq // Hkv, Nq, Nk, kv_counts.shape[2], order.numel(), *q_map, *kv_map, scale * LOG2E,
            **variant)
        return out, (lse if with_lse else None)
    kernels.gluon_block_sparse_fwd_kernel[(order.numel(),)](
        q, k, v, out, lse, kv_indices, kv_counts, order,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), *table_args,
        Hq, Hq // Hkv, Nq, Nk, kv_counts.shape[2], scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, **variant,
    )
    return out, (lse if with_lse else None)


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x (B, H, N, D) as a 2-D matrix for a host TMA descriptor, and where (b, h, token n) lands:
    row b * rb + h * rh + n, column h * ch. A contiguous tensor is (B*H*N, D) with (H*N, N, 0); a
    (B, N, H, D) view, the layout of a projection's output, is (B*N, H*D) with (N, 0, D); any other
    layout is copied to a contiguous tensor first."""
    B, H, N, D = x.shape
    if x.is_contiguous():
        return x.view(B * H * N, D), (H * N, N, 0)
    if x.transpose(1, 2).is_contiguous():
        return x.transpose(1, 2).view(B * N, H * D), (N, 0, D)
    return _flat(x.contiguous())


def _descriptor(x: torch.Tensor, rows: int):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    flat, mapping = _flat(x)
    D = x.shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for([rows, D], gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, D], layout), mapping
