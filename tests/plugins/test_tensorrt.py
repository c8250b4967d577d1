"""The TensorRT path as far as this machine allows (no TensorRT here, see docs/EXPORT.md):

- vsopt's kernel compiles ahead of time to PTX for sm_90 without a GPU (triton.compile with
  GPUTarget("cuda", 90, 32)) for a representative set of the launcher's forms: every tile of its
  list (quant none, head_dim 128, 128x128 table blocks, which every tile divides), every quant mode
  at the first 128x128 choice for head_dim 64 and 128, a ragged key length, and the TensorRT
  entry point (ptx.representative_configs). The full set (25 table blocks x 2 head dims x 4 modes
  x 2 dtypes x up to 4 tiles) takes too long for CI.
- the ONNX TensorRT's parser would read: every vsopt node with plugin_namespace, aot chosen by
  quant mode, the work-order input;
- the engine build skips, with the reason."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from vsopt.plugins.tensorrt import ptx  # noqa: E402


def test_the_kernel_compiles_to_ptx_for_sm_90_for_every_tile_and_quant_mode(tmp_path):
    index = ptx.compile_configs("representative", tmp_path)
    configs = [v["config"] for v in index.values()]
    from vsopt.kernels.block_sparse import launch

    tiles = {(t.block_m, t.block_n, t.num_warps, t.num_stages, t.use_tma) for t in launch.all_tiles()}
    assert tiles <= {(c["block_m"], c["block_n"], c["num_warps"], c["num_stages"], c["use_tma"]) for c in configs}
    assert {c["quant"] for c in configs} == {"none", "int8", "fp8", "int8_fp8", "int8_int8"}
    assert any(c["kernel"] == "trt_entry" for c in configs) and any(not c["even_n"] for c in configs)
    for name, meta in index.items():
        text = (tmp_path / f"{name}.ptx").read_text()
        assert ".target sm_90" in text and f".entry {meta['kernel_name']}" in text
        assert meta["num_warps"] == meta["config"]["num_warps"] and meta["shared"] >= 0


def test_trt_export_writes_the_onnx_and_ptx_and_names_what_is_missing(tmp_path):
    import vsopt
    from vsopt.deploy import ExportError
    from vsopt.plugins.tensorrt.build import prepare_onnx

    from .mixed_plans import mixed_plan

    torch.manual_seed(0)
    model = _TwoHeads().eval()
    x = torch.randn(1, 64, 128)
    plan = mixed_plan(model, (x,), block=16)
    out = tmp_path / "trt"
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the engine build is exercised by benchmarks/export_gpu.py")
    with pytest.raises(ExportError, match="TensorRT is not installed") as e:
        vsopt.export(model, (x,), plan, "trt", out, check=False)
    assert "model.onnx" in str(e.value) and "PTX" in str(e.value) and "python -m vsopt.plugins.tensorrt.build" in str(e.value)
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    ptx_files = sorted((out / "ptx").glob("*.ptx"))
    assert ptx_files and any("trt_entry" in p.name for p in ptx_files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]        # no staging left behind

    import onnx

    model_proto = prepare_onnx(onnx.load(str(out / "model.onnx")))
    nodes = [n for n in model_proto.graph.node if n.domain == "vsopt"]
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"vsopt" and not {"site_id", "heads", "orders"} & set(attrs)
        if n.op_type == "BlockSparseAttention":
            assert len(n.input) == 6 and attrs["aot"] == int(attrs["quant"] == b"none")
    pytest.skip("TensorRT is not installed (no full TensorRT on the package index; TensorRT-RTX refuses sm_90): "
                "engine build not run")


class _TwoHeads(torch.nn.Module):
    """A tiny attention with head_dim 64, a head dim vsopt's GPU kernel is built for."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(128, 3 * 128)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 2, 64).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
