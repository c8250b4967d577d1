"""TensorRT plugins for the custom ONNX form's vsopt nodes (TensorRT >= 10.8, tensorrt.plugin).

Importing this module registers, in TensorRT's plugin registry (namespace "vsopt"):

    vsopt::BlockSparseAttention   register (output like q), autotune (the input types), a JIT impl
                                  (any quant mode: torch.ops.vsopt.block_sparse_attention on
                                  TensorRT's stream, the Triton launcher), and an AOT impl
                                  (quant none: entry.py compiled to PTX for the node's spec; the
                                  engine then runs without Python)
    vsopt::PermuteTokens / UnpermuteTokens / MaskToTable / DynamicBlockMask
                                  register + JIT impl through the same torch ops

NOT RUN HERE: TensorRT is not installable on the machines this was written on (DEVICE.md: no full
TensorRT on the package index; TensorRT-RTX refuses sm_90). What is tested is the PTX the AOT impl
returns (ptx.py, tests/plugins) and the ONNX it parses (build.prepare_onnx).
"""
from __future__ import annotations

import math
from typing import Tuple

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

import vsopt.core.dynamic  # noqa: F401  (registers torch.ops.vsopt.dynamic_block_mask)
import vsopt.core.ops  # noqa: F401  (registers torch.ops.vsopt.*)

from . import ptx
from .entry import SCALARS

_DT = {trt.float16: "fp16", trt.bfloat16: "bf16", trt.float32: "fp32"}


def _torch(t, stream):
    return torch.as_tensor(t, device="cuda")


def _static(expr) -> int:
    if not expr.is_constant:
        raise ValueError("vsopt's TensorRT plugins take static shapes (the export is static)")
    return int(expr.constant_value())


@trtp.register("vsopt::BlockSparseAttention")
def _bsa_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, kv_indices: trtp.TensorDesc,
              kv_counts: trtp.TensorDesc, row_order: trtp.TensorDesc, scale: float, head_dim: int, dtype: str,
              quant: str, block_m: int, block_n: int, layout: str, softcap: float) -> trtp.TensorDesc:
    return q.like()


@trtp.autotune("vsopt::BlockSparseAttention")
def _bsa_autotune(q, k, v, kv_indices, kv_counts, row_order, outputs):
    return [trtp.AutoTuneCombination("FP16|BF16|FP32, FP16|BF16|FP32, FP16|BF16|FP32, INT32, INT32, INT32, "
                                     "FP16|BF16|FP32")]


@trtp.impl("vsopt::BlockSparseAttention")
def _bsa_impl(q, k, v, kv_indices, kv_counts, row_order, scale: float, block_m: int, block_n: int, quant: str,
              softcap: float, outputs, stream) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        args = [_torch(x, stream) for x in (q, k, v, kv_indices, kv_counts)]
        out = torch.ops.vsopt.block_sparse_attention(*args, scale, block_m, block_n, quant, softcap)
        _torch(outputs[0], stream).copy_(out)


@trtp.aot_impl("vsopt::BlockSparseAttention")
def _bsa_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, kv_indices: trtp.TensorDesc,
             kv_counts: trtp.TensorDesc, row_order: trtp.TensorDesc, scale: float, block_m: int, block_n: int,
             quant: str, softcap: float, outputs: Tuple[trtp.TensorDesc], tactic: int):
    if quant != "none":
        raise ValueError(f"vsopt::BlockSparseAttention AOT: quant {quant!r} needs the quantization kernels; "
                         "build this node with aot=0 (the JIT implementation)")
    B, H, NQ, D = (_static(e) for e in q.shape_expr)
    Hkv, NK = _static(k.shape_expr[1]), _static(k.shape_expr[2])
    Bt, _, QB, W = (_static(e) for e in kv_indices.shape_expr)
    config = ptx.trt_entry_config(D, _DT[q.dtype], block_m, block_n, NK % block_n == 0, scale * math.log2(math.e),
                                  softcap * math.log2(math.e))
    compiled = ptx._compile_one(config)
    values = {"stride_qb": H * NQ * D, "stride_qh": NQ * D, "stride_qn": D, "stride_kb": Hkv * NK * D,
              "stride_kh": NK * D, "stride_kn": D, "stride_ib": H * QB * W if Bt > 1 else 0, "stride_ih": QB * W,
              "stride_im": W, "stride_cb": H * QB if Bt > 1 else 0, "stride_ch": QB, "H": H, "GROUP": H // Hkv,
              "NQ": NQ, "NK": NK, "QB": QB, "KB": -(-NK // block_n)}
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(values[n]) for n in SCALARS])
    launch = trtp.KernelLaunchParams()
    launch.grid_x = B * H * QB * (block_m // config.block_m)
    launch.block_x = compiled["num_warps"] * 32
    launch.shared_mem = compiled["shared"]
    return compiled["kernel_name"].encode(), compiled["ptx"].encode(), launch, extra


@trtp.register("vsopt::PermuteTokens")
def _permute_desc(x: trtp.TensorDesc, perm: trtp.TensorDesc) -> trtp.TensorDesc:
    return x.like()


@trtp.register("vsopt::UnpermuteTokens")
def _unpermute_desc(x: trtp.TensorDesc, perm: trtp.TensorDesc) -> trtp.TensorDesc:
    return x.like()


@trtp.impl("vsopt::PermuteTokens")
def _permute_impl(x, perm, outputs, stream) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        _torch(outputs[0], stream).copy_(torch.ops.vsopt.permute_tokens(_torch(x, stream), _torch(perm, stream)))


@trtp.impl("vsopt::UnpermuteTokens")
def _unpermute_impl(x, perm, outputs, stream) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        _torch(outputs[0], stream).copy_(torch.ops.vsopt.unpermute_tokens(_torch(x, stream), _torch(perm, stream)))


@trtp.register("vsopt::MaskToTable")
def _table_desc(mask: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    counts = trtp.from_shape_expr(tuple(mask.shape_expr)[:-1], dtype=trt.int32)
    return trtp.from_shape_expr(tuple(mask.shape_expr), dtype=trt.int32), counts


@trtp.impl("vsopt::MaskToTable")
def _table_impl(mask, outputs, stream) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        idx, counts = torch.ops.vsopt.mask_to_table(_torch(mask, stream))
        _torch(outputs[0], stream).copy_(idx)
        _torch(outputs[1], stream).copy_(counts)


@trtp.register("vsopt::DynamicBlockMask")
def _dyn_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, scale: float, block_m: int, block_n: int, method: str,
              value: float, reuse_steps: int) -> trtp.TensorDesc:
    B, H, NQ, _ = q.shape_expr
    return trtp.from_shape_expr((B, H, trtp.cdiv(NQ, block_m), trtp.cdiv(k.shape_expr[2], block_n)), dtype=trt.bool)


@trtp.impl("vsopt::DynamicBlockMask")
def _dyn_impl(q, k, scale: float, block_m: int, block_n: int, method: str, value: float, reuse_steps: int,
              outputs, stream) -> None:
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        mask = torch.ops.vsopt.dynamic_block_mask(_torch(q, stream), _torch(k, stream), scale, block_m, block_n,
                                                  method, value, 0, "")   # no reuse across engine calls
        _torch(outputs[0], stream).copy_(mask)

