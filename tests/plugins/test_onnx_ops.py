"""The ONNX translation of each vsopt op, on small tensors: the portable form in onnxruntime
against the op's PyTorch path (every quant mode, grouped kv heads, ragged blocks, skipped rows,
both dynamic rules, per-head and shared permutations, the Attention op and the MatMul/Softmax
route), and the custom form against its schemas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vsopt.core.dynamic  # noqa: F401  (registers vsopt::dynamic_block_mask)
from vsopt.core.orders import head_permutations
from vsopt.core.ir import TokenGrid

from ..conftest import max_rel_err

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

vs = torch.ops.vsopt
GRID = TokenGrid(2, 3, 4, text_before=2)   # 26 tokens: ragged 16-blocks, text before video


class Ops(torch.nn.Module):
    """Every translated op once: permute (per head) -> block-sparse (static table) -> unpermute,
    a dynamic mask -> table -> block-sparse, permute/unpermute with one shared order, dense
    attention with a mask."""

    def __init__(self, quant: str, method: str, H: int = 4, Hkv: int = 2, N: int = 26, block: int = 16):
        super().__init__()
        self.quant, self.method, self.block = quant, method, block
        qb = -(-N // block)
        g = torch.Generator().manual_seed(0)
        masks = torch.rand(1, H, qb, qb, generator=g) < 0.6
        masks[:, 1] = False                                  # a skipped head: rows that visit nothing
        masks[:, 2, 0] = False                               # one empty row
        idx, counts = vs.mask_to_table(masks)
        self.register_buffer("kv_indices", idx)
        self.register_buffer("kv_counts", counts)
        self.register_buffer("perm", head_permutations(GRID, ["hwf", "fhw", "wfh", "whf"]))
        self.register_buffer("perm_kv", head_permutations(GRID, ["hwf", "wfh"]))
        self.register_buffer("shared", head_permutations(GRID, ["whf"]))

    def forward(self, q, k, v, bias):
        s = q.shape[-1] ** -0.5
        qp, kp, vp = vs.permute_tokens(q, self.perm), vs.permute_tokens(k, self.perm_kv), vs.permute_tokens(v, self.perm_kv)
        a = vs.unpermute_tokens(vs.block_sparse_attention(qp, kp, vp, self.kv_indices, self.kv_counts, s, self.block,
                                                          self.block, self.quant), self.perm)
        mask = vs.dynamic_block_mask(q, k, s, self.block, self.block, self.method, 0.6, 0, "test")
        idx, counts = vs.mask_to_table(mask)
        b = vs.block_sparse_attention(q, k, v, idx, counts, s, self.block, self.block, self.quant)
        c = vs.unpermute_tokens(vs.permute_tokens(q, self.shared) * 2.0, self.shared)
        d = vs.attention(q, k, v, bias, s, False)
        return a, b, c, d


def _inputs(H=4, Hkv=2, N=26, D=16):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, N, D, generator=g) for h in (H, Hkv, Hkv))
    return q, k, v, torch.randn(1, 1, N, N, generator=g) * 0.1


def _onnx(module, inputs, form, opset):
    from vsopt.plugins.onnx.custom import custom_table
    from vsopt.plugins.onnx.portable import portable_table

    ep = torch.export.export(module, inputs, strict=False)
    table = portable_table(opset) if form == "portable" else custom_table(opset)
    return torch.onnx.export(ep, inputs, dynamo=True, opset_version=opset, custom_translation_table=table,
                             verbose=False).model_proto


@pytest.mark.parametrize("quant,method,opset", [("none", "top_k", 23), ("int8", "cumulative_mass", 23),
                                                ("fp8", "top_k", 23), ("int8_fp8", "cumulative_mass", 19),
                                                ("int8", "top_k", 18), ("int8_int8", "top_k", 18)])
def test_portable_form_runs_in_onnxruntime_and_matches_the_ops(quant, method, opset):
    module, inputs = Ops(quant, method), _inputs()
    with torch.no_grad():
        want = module(*inputs)
    proto = _onnx(module, inputs, "portable", opset)
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}          # standard ops only
    ops = {n.op_type for n in proto.graph.node}
    assert ("Attention" in ops) == (opset >= 23) and ("Softmax" in ops)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
    for g, w in zip(got, want):
        assert max_rel_err(torch.from_numpy(g), w) <= 1e-5
    assert np.all(got[0][:, 1] == 0)                                            # the skipped head


def test_portable_form_refuses_float8_below_opset_19():
    module, inputs = Ops("fp8", "top_k"), _inputs()
    with pytest.raises(Exception, match="opset >= 19"):
        _onnx(module, inputs, "portable", 18)


def test_custom_form_is_one_vsopt_node_per_op_and_passes_the_checker():
    from vsopt.kernels.spec import KernelSpec
    from vsopt.plugins.onnx import schemas

    module, inputs = Ops("int8", "cumulative_mass"), _inputs()
    proto = _onnx(module, inputs, "custom", 23)
    schemas.register()
    onnx.checker.check_model(proto, full_check=True)
    vsopt_nodes = [n for n in proto.graph.node if n.domain == schemas.DOMAIN]
    assert sorted(n.op_type for n in vsopt_nodes) == sorted(
        ["PermuteTokens"] * 4 + ["UnpermuteTokens"] * 2 + ["BlockSparseAttention"] * 2 + ["DynamicBlockMask",
                                                                                             "MaskToTable"])
    bsa = next(n for n in vsopt_nodes if n.op_type == "BlockSparseAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bsa.attribute}
    spec = KernelSpec(16, torch.float32, "int8", 16, 16).attributes()
    assert {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items() if k in spec} == spec
    assert abs(attrs["scale"] - 0.25) < 1e-7
    init = {t.name for t in proto.graph.initializer}
    assert bsa.input[3] in init and bsa.input[4] in init                       # the tables are initializers
    dyn = next(n for n in vsopt_nodes if n.op_type == "DynamicBlockMask")
    assert {a.name for a in dyn.attribute} >= {"method", "value", "reuse_steps", "block_m", "block_n", "scale"}


def test_schemas_reject_a_node_without_its_kernel_spec():
    from onnx import TensorProto as T
    from onnx import helper

    from vsopt.plugins.onnx import schemas

    schemas.register()
    node = helper.make_node("BlockSparseAttention", ["q", "k", "v", "i", "c"], ["o"], domain="vsopt", scale=1.0)
    io = [helper.make_tensor_value_info(n, T.FLOAT, [1, 1, 16, 16]) for n in "qkv"] + \
        [helper.make_tensor_value_info(n, T.INT32, [1, 1, 1, 1]) for n in "ic"]
    model = helper.make_model(helper.make_graph([node], "g", io, [helper.make_tensor_value_info("o", T.FLOAT, [1, 1, 16, 16])]),
                              opset_imports=[helper.make_opsetid("", 23), schemas.opset_import()])
    with pytest.raises(onnx.checker.ValidationError, match="Required attribute"):
        onnx.checker.check_model(model)
