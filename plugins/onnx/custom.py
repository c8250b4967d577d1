"""The custom ONNX form: each vsopt op as one node of the "vsopt" domain (schemas.py), with the
plan's tables as initializers and the kernel spec as attributes, so a runtime with vsopt's kernel
(a TensorRT plugin, an onnxruntime custom op) runs every site at kernel speed.

    block_sparse_attention -> vsopt.BlockSparseAttention   (KernelSpec.attributes() + scale)
    permute_tokens         -> vsopt.PermuteTokens
    unpermute_tokens       -> vsopt.UnpermuteTokens
    mask_to_table          -> vsopt.MaskToTable
    dynamic_block_mask     -> vsopt.DynamicBlockMask        (method, value, reuse_steps)
    attention (dense)      -> standard ONNX (attention.py): any runtime has dense attention

The translation functions see only a node's arguments; where a node came from (site_id, heads,
the heads' token orders) is in the exported program's node metadata, which annotate() copies onto
the ONNX nodes after the conversion (the exporter keeps each ONNX node's FX node in node.meta).
"""
from __future__ import annotations

from typing import Mapping

import onnx_ir as ir
import torch
from onnxscript import values

from vsopt.kernels.spec import KernelSpec

from . import NODE_META_KEY as META_KEY
from . import schemas
from .attention import dense_attention
from .building import dims

_DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
           ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.DOUBLE: torch.float64}


def custom_table(opset: int) -> dict:
    """The translation table (torch op overload -> ONNX function) of the custom form."""
    schemas.register()
    vsopt_ops = values.Opset(schemas.DOMAIN, schemas.VERSION)

    def attention(q, k, v, attn_mask=None, scale: float = 1.0, is_causal: bool = False, softcap: float = 0.0):
        return dense_attention(q, k, v, attn_mask, scale, is_causal, softcap, opset=opset)

    def permute_tokens(x, perm):
        return vsopt_ops.PermuteTokens(x, perm)

    def unpermute_tokens(x, perm):
        return vsopt_ops.UnpermuteTokens(x, perm)

    def mask_to_table(mask):
        return vsopt_ops.MaskToTable(mask)

    def block_sparse_attention(q, k, v, kv_indices, kv_counts, scale: float, block_m: int, block_n: int,
                               quant: str = "none", softcap: float = 0.0):
        spec = KernelSpec(head_dim=dims(q)[3], dtype=_DTYPES[q.dtype], quant=quant, block_m=block_m, block_n=block_n,
                          softcap=float(softcap))
        return vsopt_ops.BlockSparseAttention(q, k, v, kv_indices, kv_counts, scale=float(scale), **spec.attributes())

    def dynamic_block_mask(q, k, scale: float, block_m: int, block_n: int, method: str, value: float,
                           reuse_steps: int, cache_key: str):
        # cache_key names the run-time cache entry of one compiled graph: a runtime keys by site_id.
        return vsopt_ops.DynamicBlockMask(q, k, scale=float(scale), block_m=block_m, block_n=block_n, method=method,
                                          value=float(value), reuse_steps=reuse_steps)

    vs = torch.ops.vsopt
    return {vs.attention.default: attention, vs.permute_tokens.default: permute_tokens,
            vs.unpermute_tokens.default: unpermute_tokens, vs.mask_to_table.default: mask_to_table,
            vs.block_sparse_attention.default: block_sparse_attention,
            vs.dynamic_block_mask.default: dynamic_block_mask}


def annotate(model: ir.Model) -> int:
    """Copy each vsopt node's origin (site_id, heads, orders) from its FX node's metadata onto
    its attributes; returns the number of nodes annotated."""
    done = 0
    for node in model.graph.all_nodes():
        if node.domain != schemas.DOMAIN:
            continue
        fx_node = node.meta.get("node")
        where: Mapping = (fx_node.meta.get("custom") or {}).get(META_KEY, {}) if fx_node is not None else {}
        if not where:
            continue
        node.attributes["site_id"] = ir.AttrString("site_id", str(where["site_id"]))
        if where.get("heads") is not None:
            node.attributes["heads"] = ir.AttrInt64s("heads", [int(h) for h in where["heads"]])
        if node.op_type == "BlockSparseAttention" and where.get("orders") is not None:
            node.attributes["orders"] = ir.AttrStrings("orders", [str(o) for o in where["orders"]])
        done += 1
    return done
