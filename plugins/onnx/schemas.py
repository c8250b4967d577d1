"""The ONNX operator schemas of the "vsopt" domain: one node per vsopt op in the custom ONNX form.

    vsopt.BlockSparseAttention(q, k, v, kv_indices, kv_counts) -> out
    vsopt.PermuteTokens(x, perm) -> y            y[:, h, i] = x[:, h, perm[h, i]]
    vsopt.UnpermuteTokens(x, perm) -> y          y[:, h, perm[h, i]] = x[:, h, i]
    vsopt.MaskToTable(mask) -> (kv_indices, kv_counts)
    vsopt.DynamicBlockMask(q, k) -> mask         a dynamic head's mask from pooled block scores

The semantics are those of torch.ops.vsopt.* (vsopt/core/ops.py, vsopt/core/dynamic.py); layouts
are (B, H, N, D). BlockSparseAttention carries the kernel spec as attributes
(vsopt.kernels.spec.KernelSpec.attributes(): head_dim, dtype, quant, block_m, block_n, layout,
softcap) so
a runtime with a vsopt kernel (plugins/tensorrt) picks the compiled form from the node alone, plus
where it came from: site_id, heads (the site's query heads this launch runs) and orders (each
head's token order). register() makes onnx.checker and onnxscript know the domain.
"""
from __future__ import annotations

import onnx
import onnx.defs
from onnx.defs import OpSchema

DOMAIN = "vsopt"
VERSION = 1

_FLOAT = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_A = OpSchema.AttrType


def _io(name: str, type_str: str, doc: str) -> OpSchema.FormalParameter:
    return OpSchema.FormalParameter(name, type_str, doc)


def _required(name: str, kind: OpSchema.AttrType, doc: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, kind, doc, required=True)


def _optional(name: str, kind: OpSchema.AttrType, doc: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, kind, doc, required=False)


_WHERE = [_optional("site_id", _A.STRING, "the attention site (module path) this node belongs to"),
          _optional("heads", _A.INTS, "the site's query heads this node runs, in order")]

SCHEMAS = [
    OpSchema(
        "BlockSparseAttention", DOMAIN, VERSION,
        "Block-sparse attention: query block qb of head h attends to the key blocks "
        "kv_indices[b, h, qb, :kv_counts[b, h, qb]] (b = 0 when the table has one batch row); rows "
        "that visit no block output 0. q (B, H, Nq, D), k and v (B, Hkv, Nk, D) with H % Hkv == 0.",
        inputs=[_io("q", "T", "queries (B, H, Nq, D)"), _io("k", "T", "keys (B, Hkv, Nk, D)"),
                _io("v", "T", "values (B, Hkv, Nk, D)"),
                _io("kv_indices", "tensor(int32)", "key blocks per query block (Bt, H, QB, MAXK), ascending"),
                _io("kv_counts", "tensor(int32)", "valid entries per query block (Bt, H, QB)")],
        outputs=[_io("out", "T", "(B, H, Nq, D) in q's type")],
        type_constraints=[("T", _FLOAT, "attention inputs")],
        attributes=[_required("scale", _A.FLOAT, "softmax scale"),
                    _required("head_dim", _A.INT, "D"),
                    _required("dtype", _A.STRING, "input dtype the kernel was specified for"),
                    _required("quant", _A.STRING, "precision: none, int8, fp8, int8_fp8 or int8_int8"),
                    _required("block_m", _A.INT, "query block of the table"),
                    _required("block_n", _A.INT, "key block of the table"),
                    _required("layout", _A.STRING, "memory layout the kernel reads (bhnd)"),
                    _optional("softcap", _A.FLOAT, "logit soft cap: scores -> softcap * tanh(scores / softcap) "
                              "before the softmax (0 or absent: none)"),
                    *_WHERE,
                    _optional("orders", _A.STRINGS, "token order of each head in `heads` (the plan's)")]),
    OpSchema(
        "PermuteTokens", DOMAIN, VERSION, "Per-head token reorder: y[:, h, i] = x[:, h, perm[h, i]].",
        inputs=[_io("x", "T", "(B, H, N, D)"), _io("perm", "tensor(int64)", "(H or 1, N) permutations")],
        outputs=[_io("y", "T", "(B, H, N, D)")],
        type_constraints=[("T", _FLOAT, "tokens")], attributes=list(_WHERE)),
    OpSchema(
        "UnpermuteTokens", DOMAIN, VERSION, "Inverse of PermuteTokens: y[:, h, perm[h, i]] = x[:, h, i].",
        inputs=[_io("x", "T", "(B, H, N, D)"), _io("perm", "tensor(int64)", "(H or 1, N) permutations")],
        outputs=[_io("y", "T", "(B, H, N, D)")],
        type_constraints=[("T", _FLOAT, "tokens")], attributes=list(_WHERE)),
    OpSchema(
        "MaskToTable", DOMAIN, VERSION,
        "Block mask -> table: the True columns of each row, ascending, then zeros; and their count.",
        inputs=[_io("mask", "tensor(bool)", "(Bt, H, QB, KB)")],
        outputs=[_io("kv_indices", "tensor(int32)", "(Bt, H, QB, KB)"),
                 _io("kv_counts", "tensor(int32)", "(Bt, H, QB)")],
        attributes=list(_WHERE)),
    OpSchema(
        "DynamicBlockMask", DOMAIN, VERSION,
        "A dynamic head's block mask, predicted from mean-pooled q and k blocks (vsopt.core.dynamic): "
        "top_k keeps ceil(value * KB) key blocks per row, cumulative_mass the fewest whose estimated "
        "mass reaches value; the diagonal blocks are kept for self-attention. reuse_steps > 0: a runtime "
        "may reuse the mask for that many following denoising steps.",
        inputs=[_io("q", "T", "(B, H, Nq, D)"), _io("k", "T", "(B, Hkv, Nk, D)")],
        outputs=[_io("mask", "tensor(bool)", "(B, H, QB, KB)")],
        type_constraints=[("T", _FLOAT, "attention inputs")],
        attributes=[_required("scale", _A.FLOAT, "softmax scale"),
                    _required("block_m", _A.INT, "query block"), _required("block_n", _A.INT, "key block"),
                    _required("method", _A.STRING, "top_k or cumulative_mass"),
                    _required("value", _A.FLOAT, "the method's value in (0, 1]"),
                    _required("reuse_steps", _A.INT, "denoising steps a mask may be reused for"),
                    *_WHERE]),
]
OP_TYPES = tuple(s.name for s in SCHEMAS)


def register() -> None:
    """Register the domain's schemas with onnx (idempotent): onnx.checker then validates vsopt
    nodes, and onnxscript can emit them."""
    for schema in SCHEMAS:
        if not onnx.defs.has(schema.name, DOMAIN):
            onnx.defs.register_schema(schema)


def opset_import() -> onnx.OperatorSetIdProto:
    return onnx.helper.make_opsetid(DOMAIN, VERSION)
