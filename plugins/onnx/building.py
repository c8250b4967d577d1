"""Small standard-ONNX building blocks over static shapes, for the translation functions.

The translation functions run inside torch.onnx's exporter (dynamo=True): their tensor arguments
are onnx_ir Values with static shapes (vsopt exports one shape per artifact), and every op called
on `op` below is recorded into the ONNX graph. Nothing here computes at export time except shapes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

INT32, INT64, BOOL, FLOAT = ir.DataType.INT32, ir.DataType.INT64, ir.DataType.BOOL, ir.DataType.FLOAT


def dims(x: ir.Value) -> list[int]:
    """The static shape of an argument of a translation function (a vsopt export has no dynamic
    dimensions). Values made inside a translation have no shape: track those by hand."""
    if x.shape is None:
        raise ValueError(f"{x.name}: no shape recorded")
    out = []
    for d in x.shape:
        if not isinstance(d, int):
            raise ValueError(f"vsopt's ONNX export needs static shapes; {x.name} has shape {x.shape}")
        out.append(d)
    return out


def i64(values: Sequence[int] | int) -> ir.Value:
    """An int64 constant (a list gives a 1-D tensor, an int a scalar)."""
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.int64)))


def const(array: np.ndarray) -> ir.Value:
    return op.Constant(value=ir.tensor(np.ascontiguousarray(array)))


def scalar_like(value: float, like: ir.Value) -> ir.Value:
    """A scalar of like's element type."""
    return op.CastLike(op.Constant(value=ir.tensor(np.asarray(value, dtype=np.float32))), like)


def arange(n: int) -> ir.Value:
    return i64(list(range(n)))


def repeat_heads(x: ir.Value, shape: Sequence[int], heads: int) -> ir.Value:
    """x of `shape` (B, Hkv, N, D) -> (B, heads, N, D), each kv head repeated heads // Hkv times
    in place (torch's repeat_interleave on dim 1: grouped-query attention)."""
    B, Hkv, N, D = shape
    if Hkv == heads:
        return x
    group = heads // Hkv
    x = op.Expand(op.Unsqueeze(x, i64([2])), i64([B, Hkv, group, N, D]))
    return op.Reshape(x, i64([B, heads, N, D]))


def blocks_to_tokens(blocks: ir.Value, shape: Sequence[int], rows: int, cols: int, block_m: int,
                     block_n: int) -> ir.Value:
    """A block mask of `shape` (..., QB, KB) -> the token mask (..., rows, cols): every block
    repeated block_m x block_n times, cut to rows x cols (the last blocks may be ragged)."""
    *lead, QB, KB = shape
    x = op.Unsqueeze(blocks, i64([len(lead) + 1, len(lead) + 3]))             # (..., QB, 1, KB, 1)
    x = op.Expand(x, i64([*lead, QB, block_m, KB, block_n]))
    x = op.Reshape(x, i64([*lead, QB * block_m, KB * block_n]))
    if (QB * block_m, KB * block_n) != (rows, cols):
        x = op.Slice(x, i64([0, 0]), i64([rows, cols]), i64([len(lead), len(lead) + 1]))
    return x


def rows_to_tokens(rows_mask: ir.Value, shape: Sequence[int], n: int, block: int) -> ir.Value:
    """A per-block-row mask of `shape` (..., QB) -> per token (..., n)."""
    *lead, QB = shape
    x = op.Expand(op.Unsqueeze(rows_mask, i64([len(lead) + 1])), i64([*lead, QB, block]))
    x = op.Reshape(x, i64([*lead, QB * block]))
    if QB * block != n:
        x = op.Slice(x, i64([0]), i64([n]), i64([len(lead)]))
    return x


def table_to_blocks(kv_indices: ir.Value, kv_counts: ir.Value, kb: int) -> ir.Value:
    """A block table (Bt, H, QB, MAXK) with counts (Bt, H, QB) -> the bool block mask
    (Bt, H, QB, kb): entry j of a row is valid when j < count (one-hot and reduce: no scatter,
    so padding entries never collide)."""
    width = dims(kv_indices)[-1]
    valid = op.Less(arange(width), op.Unsqueeze(op.Cast(kv_counts, to=INT64), i64([-1])))    # (Bt,H,QB,W)
    hit = op.Equal(op.Unsqueeze(op.Cast(kv_indices, to=INT64), i64([-1])), arange(kb))      # (Bt,H,QB,W,kb)
    hit = op.And(hit, op.Unsqueeze(valid, i64([-1])))
    return op.Cast(op.ReduceMax(op.Cast(hit, to=INT32), i64([3]), keepdims=0), to=BOOL)


def first_output(outputs) -> ir.Value:
    """The first output of an op that may record several (optional outputs)."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs
