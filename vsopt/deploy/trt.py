"""trt: a folder with what a TensorRT deployment of the optimized model needs, and the engine
where TensorRT is installed.

    OUT/model.onnx      the custom ONNX form (vsopt-domain nodes; onnx.py)
    OUT/ptx/*.ptx       vsopt's kernel for sm_90, per site spec: every tile the launcher may pick
                        and the TensorRT-entry form the AOT plugin launches (plugins/tensorrt/ptx.py),
                        with ptx/index.json (kernel names, shared memory, configs)
    OUT/manifest.json   the sites, their kernel specs and the files
    OUT/model.engine    only with TensorRT (plugins/tensorrt/build.py; plugins/tensorrt/plugin.py)

Without TensorRT the folder is still written (atomically) and the export then fails with one
line naming what is missing, what was written, and the command that builds the engine.
"""
from __future__ import annotations

import math
from pathlib import Path

from vsopt.core.io import atomic_output, atomic_write_json
from vsopt.kernels.block_sparse.inputs import GPU_HEAD_DIMS   # head dims with a GPU kernel

from .artifact import ExportError
from .program import RewrittenProgram
from .progress import Report, step


def kernel_specs(model) -> list[dict]:
    """One entry per BlockSparseAttention node of a custom-form onnx.ModelProto: its site, spec
    attributes, scale and EVEN_N."""
    import onnx

    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in (*model.graph.value_info, *model.graph.input)}
    out = []
    for node in model.graph.node:
        if node.domain != "vsopt" or node.op_type != "BlockSparseAttention":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        a = {k: v.decode() if isinstance(v, bytes) else v for k, v in a.items()}
        nk = (shapes.get(node.input[1]) or [0, 0, 0])[2]
        out.append({"node": node.name, "site_id": a.get("site_id", ""), "head_dim": a["head_dim"],
                    "dtype": a["dtype"], "quant": a["quant"], "block_m": a["block_m"], "block_n": a["block_n"],
                    "scale": a["scale"], "even_n": bool(nk) and nk % a["block_n"] == 0})
    return out


def _ptx_request(specs: list[dict]) -> tuple[dict, list[str]]:
    from vsopt.plugins.tensorrt.ptx import DTYPES

    launcher, entries, skipped = [], [], []
    for s in specs:
        if s["head_dim"] not in GPU_HEAD_DIMS or s["dtype"] not in DTYPES:
            skipped.append(f"{s['site_id']}: head_dim {s['head_dim']} / {s['dtype']} has no GPU kernel (the op runs "
                           "its PyTorch reference there)")
            continue
        dt = DTYPES[s["dtype"]]
        launcher.append({"head_dim": s["head_dim"], "dtype": dt, "quant": s["quant"], "block_m": s["block_m"],
                         "block_n": s["block_n"], "even_n": s["even_n"]})
        if s["quant"] == "none":
            entries.append({"head_dim": s["head_dim"], "dtype": dt, "block_m": s["block_m"], "block_n": s["block_n"],
                            "even_n": s["even_n"], "qk_scale_log2": s["scale"] * math.log2(math.e)})
    dedup = lambda xs: [dict(t) for t in dict.fromkeys(tuple(sorted(x.items())) for x in xs)]  # noqa: E731
    return {"launcher": dedup(launcher), "trt_entry": dedup(entries)}, skipped


def write(prog: RewrittenProgram, out_dir: Path, opset: int, progress: Report | None = None) -> list[Path]:
    from vsopt.plugins.tensorrt import ptx

    from . import onnx as onnx_format

    proto = onnx_format.convert(prog, "custom", opset, progress)
    specs = kernel_specs(proto)
    request, skipped = _ptx_request(specs)
    with atomic_output(out_dir, folder=True) as tmp:
        onnx_format.save(proto, tmp / "model.onnx")
        with step(progress, f"compiling vsopt's kernel to PTX for sm_90 ({len(request['launcher'])} spec(s))"):
            try:
                index = ptx.compile_configs(request, tmp / "ptx") if request["launcher"] else {}
            except RuntimeError as e:
                raise ExportError(str(e)) from e
        atomic_write_json(tmp / "manifest.json", {"format": "vsopt-trt", "onnx": "model.onnx", "sites": specs,
                                                   "ptx": sorted(f"ptx/{n}.ptx" for n in index),
                                                   "no_gpu_kernel": skipped})
        engine = _build_engine(tmp, progress)
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    if engine is None:
        raise ExportError(
            f"TensorRT is not installed (import tensorrt failed): no engine built. Written to {out_dir}: model.onnx "
            f"(custom form), {len(index)} PTX file(s) in ptx/, manifest.json. Build the engine where TensorRT >= 10.8 "
            f"is installed: python -m vsopt.plugins.tensorrt.build {out_dir}")
    return files


def _build_engine(folder: Path, progress: Report | None) -> Path | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return None
    from vsopt.plugins.tensorrt.build import build_engine

    with step(progress, "building the TensorRT engine"):
        try:
            return build_engine(folder / "model.onnx", folder / "model.engine")
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"TensorRT engine build failed: {type(e).__name__}: {e}") from e
