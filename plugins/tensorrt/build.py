"""Build a TensorRT engine from the custom ONNX form (needs TensorRT >= 10.8; not run here).

    python -m vsopt.plugins.tensorrt.build OUT_DIR      # OUT_DIR from `vsopt export --format trt`

prepare_onnx() turns the custom form into what TensorRT's ONNX parser takes (tested without
TensorRT): each vsopt node gets plugin_namespace="vsopt" (the parser finds plugins by op type
and namespace), BlockSparseAttention gets aot=1 for quant none (the PTX entry) else aot=0 (the
JIT implementation), its provenance attributes (site_id, heads, orders: not plugin fields) are
dropped, and it gets a sixth input, the kernel's work order: per head, query-block rows with the
most key blocks first (kernels/block_sparse/schedule.work_order), precomputed from a static table,
the natural order for a table computed at run time.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from vsopt.plugins.onnx.schemas import DOMAIN

_PROVENANCE = ("site_id", "heads", "orders")


def _shape(model: onnx.ModelProto, name: str) -> list[int] | None:
    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        if vi.name == name:
            return [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return None


def prepare_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    import torch

    from vsopt.kernels.block_sparse.launch import work_order

    model = onnx.ModelProto.FromString(model.SerializeToString())   # a copy
    init = {t.name: t for t in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if node.domain != DOMAIN:
            continue
        attrs = [a for a in node.attribute if a.name not in _PROVENANCE]
        del node.attribute[:]
        node.attribute.extend(attrs)
        node.attribute.append(onnx.helper.make_attribute("plugin_namespace", "vsopt"))
        if node.op_type != "BlockSparseAttention":
            continue
        quant = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "quant")
        node.attribute.append(onnx.helper.make_attribute("aot", int(quant in (b"none", "none"))))
        q_shape = _shape(model, node.input[0])
        if node.input[4] in init:
            counts = torch.from_numpy(numpy_helper.to_array(init[node.input[4]]).copy())
            batch = q_shape[0] if q_shape else counts.shape[0]
            order = work_order(counts, batch).numpy()
        else:
            shape = _shape(model, node.input[4])
            if not shape or not all(shape):
                raise ValueError(f"{node.name}: the shape of its run-time table is not recorded")
            order = np.arange(int(np.prod(shape)), dtype=np.int32)
        name = f"{node.name}_row_order_{i}"
        model.graph.initializer.append(numpy_helper.from_array(order.astype(np.int32), name))
        node.input.append(name)
    return model


def build_engine(onnx_path: str | Path, engine_path: str | Path) -> Path:
    """Parse the prepared model with vsopt's plugins registered and serialize the engine (a strongly
    typed network: the ONNX file's dtypes are the engine's)."""
    import tensorrt as trt

    from vsopt.core.io import atomic_write_bytes

    from . import plugin  # noqa: F401  (registers the vsopt plugins)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    model = prepare_onnx(onnx.load(str(onnx_path)))
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("TensorRT did not build the engine (see its log above)")
    return atomic_write_bytes(engine_path, bytes(engine))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    print(build_engine(out / "model.onnx", out / "model.engine"))
