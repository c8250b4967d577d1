"""Logit soft-capping through the ONNX forms: the portable form (Tanh written before the mask, in
every quant mode; dense attention too) runs in onnxruntime equal to the ops' PyTorch path, and
the custom form's BlockSparseAttention node carries the cap as its softcap attribute."""
from __future__ import annotations

import pytest
import torch

from ..conftest import max_rel_err
from .test_onnx_ops import _onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

vs = torch.ops.vsopt
CAP = 1.5


class Capped(torch.nn.Module):
    def __init__(self, quant: str, N: int = 37, block: int = 16, H: int = 2):
        super().__init__()
        self.quant, self.block = quant, block
        qb = -(-N // block)
        masks = torch.rand(1, H, qb, qb, generator=torch.Generator().manual_seed(0)) < 0.6
        masks[..., 0] = True
        idx, counts = vs.mask_to_table(masks)
        self.register_buffer("kv_indices", idx)
        self.register_buffer("kv_counts", counts)

    def forward(self, q, k, v):
        s = q.shape[-1] ** -0.5
        a = vs.block_sparse_attention(q, k, v, self.kv_indices, self.kv_counts, s, self.block, self.block, self.quant,
                                      CAP)
        return a, vs.attention(q, k, v, None, s, False, CAP)


def _inputs(N=37, D=16):
    g = torch.Generator().manual_seed(3)
    return tuple(3.0 * torch.randn(1, 2, N, D, generator=g) for _ in range(3))


@pytest.mark.parametrize("quant,opset", [("none", 23), ("none", 18), ("int8", 23), ("fp8", 23), ("int8_fp8", 19)])
def test_portable_form_applies_the_cap(quant, opset):
    module, inputs = Capped(quant), _inputs()
    with torch.no_grad():
        want = module(*inputs)
        uncapped = vs.attention(*inputs, None, 0.25, False)
    assert max_rel_err(uncapped, want[1]) > 1e-2           # the cap changes the result at these magnitudes
    proto = _onnx(module, inputs, "portable", opset)
    assert "Tanh" in {n.op_type for n in proto.graph.node}
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})
    for g, w in zip(got, want):
        assert max_rel_err(torch.from_numpy(g), w) <= 1e-5


def test_custom_form_carries_the_cap():
    from vsopt.plugins.onnx import schemas

    proto = _onnx(Capped("int8"), _inputs(), "custom", 23)
    schemas.register()
    onnx.checker.check_model(proto, full_check=True)
    (bsa,) = [n for n in proto.graph.node if n.op_type == "BlockSparseAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bsa.attribute}
    assert attrs["softcap"] == pytest.approx(CAP) and attrs["quant"] in (b"int8", "int8")


@pytest.mark.parametrize("quant", ["int8", "int8_int8"])
def test_portable_form_smooths_by_the_sampled_rows(quant):
    """N = 100 > 64: the smoothing vector is the mean of 64 gathered rows (quant_ref.smoothing_rows),
    not of all keys; under a cap its q . c is visible in the output, and the portable form's equals
    the ops' PyTorch path (which a full-mean ReduceMean would not, with the drifting key offset)."""
    N = 100
    q, k, v = _inputs(N)
    k = k + 6.0 * torch.linspace(0, 1, N)[:, None]
    module = Capped(quant, N=N)
    with torch.no_grad():
        want = module(q, k, v)
    proto = _onnx(module, (q, k, v), "portable", 23)
    assert "Gather" in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), (q, k, v))})
    assert max_rel_err(torch.from_numpy(got[0]), want[0]) <= 1e-4
