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
  - eager calls on real tensors (the kernel is not wrapped for torch.compile tracing).
validate() runs every check that needs no GPU, so the CPU suite tests it.

GluonConfig picks the kernel's variant (see gluon_kernel.py): stages of the K/V ring, PIPELINE (QK of
entry t+1 overlapped with PV of entry t), PINGPONG (two one-warpgroup consumers). DEFAULT_CONFIG is
the one tests/kernels/gpu_check_gluon.py measured fastest (docs/KERNELS.md has the numbers).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import check
from ..runtime import interpreting, plain_eager
from ..spec import QuantMode
from .inputs import check_inputs

LOG2E = math.log2(math.e)
HEAD_DIMS = (64, 128)
BLOCK_NS = (64, 128)
TRITON_VERSION = "3.6"   # Gluon's API changes between Triton releases; the kernel is written for this one


@dataclasses.dataclass(frozen=True)
class GluonConfig:
    stages: int = 2
    pipeline: bool = True
    pingpong: bool = False

    def launch_args(self) -> dict:
        return {"STAGES": self.stages, "PIPELINE": self.pipeline, "PINGPONG": self.pingpong,
                "num_warps": 4 if self.pingpong else 8,
                # 12 warps in all (consumers + the producer's warpgroup): 168 registers a thread fill the
                # register file; setmaxnreg then moves them from the producer (24) to the consumers (240).
                "maxnreg": 168}


DEFAULT_CONFIG = GluonConfig()
#: Every variant gpu_check_gluon.py compares, the simplest first.
CONFIGS = tuple(GluonConfig(s, p, pp) for s in (2, 3) for pp in (False, True) for p in (False, True))


def shared_bytes(head_dim: int, block_n: int, stages: int, itemsize: int = 2) -> int:
    """Shared memory of the kernel: the Q tile and the K/V ring (the barriers add a few bytes)."""
    return (128 * head_dim + 2 * stages * block_n * head_dim) * itemsize


def _tma_ok(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all((s * x.element_size()) % 16 == 0
                                                                 for s in x.stride()[:-1])


def validate(q, k, v, kv_indices, kv_counts, scale: float, block_m: int, block_n: int,
             quant: QuantMode | str = "none", softcap: float = 0.0, config: GluonConfig = DEFAULT_CONFIG) -> None:
    """Every check of the Gluon path that needs no GPU (raises KernelInputError naming the problem)."""
    mode = check_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n, quant, softcap)
    name = "block_sparse_attention (gluon)"
    check(mode is QuantMode.NONE, f"{name}: only quant 'none' (bf16/fp16) is implemented, got {mode.value!r}")
    check(softcap == 0, f"{name}: logit soft-capping is not implemented, got softcap={softcap}")
    check(q.dtype in (torch.float16, torch.bfloat16), f"{name}: dtype must be float16 or bfloat16, got {q.dtype}")
    check(q.shape[-1] in HEAD_DIMS, f"{name}: head_dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    check(block_m == 128 and block_n in BLOCK_NS,
          f"{name}: table blocks must be 128 x {' or '.join(map(str, BLOCK_NS))}, got {block_m} x {block_n}")
    check(scale > 0, f"{name}: scale must be positive, got {scale}")
    check(isinstance(config, GluonConfig) and config.stages >= 1, f"{name}: config must be a GluonConfig, got {config!r}")
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
                                 quant: QuantMode | str = "none", softcap: float = 0.0
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the Gluon kernel (module docstring: what it takes). config: the variant (DEFAULT_CONFIG)."""
    config = config or DEFAULT_CONFIG
    validate(q, k, v, kv_indices, kv_counts, scale, block_m, block_n, quant, softcap, config)
    check(plain_eager(q, k, v, kv_indices, kv_counts),
          "block_sparse_attention (gluon): eager calls only (the Gluon kernel is not wrapped for tracing)")
    _check_device(q)
    from . import gluon_kernel
    from .launch import _ensure_tma_allocator, work_order

    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    kv_indices, kv_counts = kv_indices.contiguous(), kv_counts.contiguous()
    Bt = kv_counts.shape[0]
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device) if with_lse else out
    order = work_order(kv_counts, B)
    _ensure_tma_allocator()   # the producer builds its TMA descriptors on the device
    gluon_kernel.gluon_block_sparse_fwd_kernel[(order.numel(),)](
        q, k, v, out, lse, kv_indices, kv_counts, order,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_indices.stride(0) if Bt > 1 else 0, kv_indices.stride(1), kv_indices.stride(2),
        kv_counts.stride(0) if Bt > 1 else 0, kv_counts.stride(1),
        Hq, Hq // Hkv, Nq, Nk, kv_counts.shape[2], scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=Nk % block_n == 0, WRITE_LSE=with_lse,
        **config.launch_args(),
    )
    return out, (lse if with_lse else None)
