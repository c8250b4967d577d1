"""Input validation of block-sparse attention, shared by the launcher, the reference path and the
fake (meta) implementation of the op; imports no Triton, so the CPU path never loads kernels.
Run once per call: by the op (vsopt.core.ops), or by the launcher when it is called directly."""
from __future__ import annotations

import math

import torch

from ..errors import check
from ..spec import QuantMode, valid_block

#: head dims the GPU kernel is built and tuned for; others run the reference (recorded by the op).
GPU_HEAD_DIMS = (64, 128)


def check_inputs(q, k, v, kv_indices, kv_counts, block_m: int, block_n: int, quant: QuantMode | str,
                 softcap: float = 0.0) -> QuantMode:
    """Shape / dtype / layout checks shared by the launcher, the reference path and the fake op.
    Returns the precision, parsed (the op's quant argument is a string). softcap: 0 (none) or a
    positive finite cap."""
    check(isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0,
          f"block_sparse_attention: softcap must be 0 (no cap) or a positive finite number, got {softcap!r}")
    check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
          f"block_sparse_attention: q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
          f"{tuple(v.shape)}")
    B, Hq, Nq, D = q.shape
    check(k.shape == v.shape and k.shape[0] == B and k.shape[3] == D,
          f"block_sparse_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must equal each other and match "
          f"q {tuple(q.shape)} in batch and head_dim")
    check(Hq % k.shape[1] == 0, f"block_sparse_attention: query heads {Hq} not a multiple of kv heads {k.shape[1]}")
    check(q.dtype == k.dtype == v.dtype, f"block_sparse_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    mode = QuantMode.parse(quant, "block_sparse_attention: quant")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        check(valid_block(blk), f"block_sparse_attention: {name} must be a power of two in [16, 256], got {blk}")
    QB = -(-Nq // block_m)
    check(kv_indices.dim() == 4 and kv_counts.dim() == 3,
          f"block_sparse_attention: kv_indices must be (Bt, H, QB, MAXK) and kv_counts (Bt, H, QB); got "
          f"{tuple(kv_indices.shape)}, {tuple(kv_counts.shape)}")
    check(kv_indices.dtype == torch.int32 and kv_counts.dtype == torch.int32,
          f"block_sparse_attention: kv_indices and kv_counts must be int32, got {kv_indices.dtype}, {kv_counts.dtype}")
    check(kv_indices.shape[:3] == kv_counts.shape and kv_counts.shape[0] in (1, B) and kv_counts.shape[1:] == (Hq, QB),
          f"block_sparse_attention: for q {tuple(q.shape)} with block_m={block_m} the table must be "
          f"(1 or {B}, {Hq}, {QB}, MAXK) with counts (1 or {B}, {Hq}, {QB}); got {tuple(kv_indices.shape)}, "
          f"{tuple(kv_counts.shape)}")
    check(q.device == k.device == v.device == kv_indices.device == kv_counts.device,
          "block_sparse_attention: all inputs must be on one device")
    return mode
