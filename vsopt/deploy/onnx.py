"""onnx: the rewritten program through torch.onnx.export(dynamo=True) with vsopt's translation
table (vsopt.plugins.onnx), in one of two forms:

    portable (default)  standard ONNX ops only: runs in any ONNX runtime (onnxruntime CPU / CUDA)
    custom              one "vsopt"-domain node per op, tables as initializers, the kernel spec as
                        attributes (for a runtime with vsopt's kernel: TensorRT, see trt.py)

opset: 23 by default (the Attention op); 18-22 write MatMul / Softmax / MatMul instead (fp8 modes
need 19). ir_version is capped at 13 (onnx 1.23 writes 14; onnxruntime 1.31 reads up to 13).
The model's metadata_props hold "vsopt.form", "vsopt.opset" and "vsopt.sites" (JSON: the
optimized sites' shapes and grids, which the custom form's read-back uses).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from vsopt.core.errors import ConfigError
from vsopt.core.io import atomic_output

from .artifact import ONNX_FORMS, ExportError
from .program import RewrittenProgram, _first_line
from .progress import Report, step

DEFAULT_OPSET = 23
MIN_OPSET = 18
MAX_IR_VERSION = 13
FP8_OPSET = 19
#: Models larger than this keep their weights in a .data file beside the .onnx (protobuf's 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30


def _require(*modules: str) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ExportError(f"the onnx format needs {' and '.join(modules)} (pip install 'vsopt[export]'): "
                              f"{e}") from None


def check_options(prog: RewrittenProgram, form: str, opset: int) -> None:
    if form not in ONNX_FORMS:
        raise ConfigError(f"onnx_form must be one of {list(ONNX_FORMS)}, got {form!r}")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    plan = getattr(prog, "plan", None)
    clustered = sorted(sid for sid, sp in (plan.sites.items() if plan is not None else ())
                       if any(h.cluster is not None for h in sp.all_heads()))
    if clustered:
        raise ConfigError(f"the plan has cluster heads (semantic clustering order) at {clustered}, which have no ONNX "
                          "form (their k-means layout op has no translation); export a plan without them")
    fp8 = sorted(q for q in prog.quant_modes if q in ("fp8", "int8_fp8"))
    if form == "portable" and fp8 and opset < FP8_OPSET:
        raise ConfigError(f"the plan quantizes with {fp8}, which the portable form expresses with float8 casts: "
                          f"use opset >= {FP8_OPSET} (got {opset})")


def convert(prog: RewrittenProgram, form: str = "portable", opset: int = DEFAULT_OPSET,
            progress: Report | None = None):
    """The ONNX model (onnx.ModelProto) of the rewritten program in `form`."""
    _require("onnx", "onnxscript")
    check_options(prog, form, opset)
    from vsopt.plugins.onnx import custom, portable

    table = portable.portable_table(opset) if form == "portable" else custom.custom_table(opset)
    with step(progress, f"converting to ONNX ({form} form, opset {opset})"), torch.no_grad():
        try:
            onnx_program = torch.onnx.export(prog.program, prog.inputs, dynamo=True, opset_version=opset,
                                             custom_translation_table=table, optimize=True, verbose=False)
        except Exception as e:  # noqa: BLE001 - the converter wraps the cause: name the innermost one
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise ExportError(f"ONNX conversion ({form} form, opset {opset}) failed: {_first_line(cause)}") from e
    model = onnx_program.model
    if form == "custom":
        custom.annotate(model)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    model.metadata_props.update(_metadata(prog, form, opset))
    return onnx_program.model_proto


def _metadata(prog: RewrittenProgram, form: str, opset: int) -> dict[str, str]:
    optimized = {s.site_id for s in prog.sites if s.optimized}
    sites = {s.site_id: {"num_heads": s.heads, "q_len": s.q_len, "kv_len": s.kv_len,
                         "grid": s.grid.to_dict() if s.grid else None}
             for s in prog.attention_sites if s.site_id in optimized}
    return {"vsopt.form": form, "vsopt.opset": str(opset), "vsopt.sites": json.dumps(sites)}


def save(proto, path: Path) -> list[Path]:
    """Write the model atomically (weights over EXTERNAL_DATA_BYTES go to path + '.data' first)."""
    import onnx

    external = proto.ByteSize() > EXTERNAL_DATA_BYTES
    with atomic_output(path) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    return [path.parent / (path.name + ".data"), path] if external else [path]


def write(prog: RewrittenProgram, path: Path, form: str = "portable", opset: int = DEFAULT_OPSET,
          progress: Report | None = None) -> list[Path]:
    proto = convert(prog, form, opset, progress)
    with step(progress, "writing the ONNX file"):
        return save(proto, path)


def load(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """A portable-form file as a callable on torch tensors (an onnxruntime session)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(f"running an ONNX file needs onnxruntime (pip install 'vsopt[export]'): {e}") from None
    session = ort.InferenceSession(str(path), providers=list(providers))
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: Any) -> tuple[torch.Tensor, ...]:
        from torch.utils._pytree import tree_leaves

        tensors = [x for x in tree_leaves(inputs) if isinstance(x, torch.Tensor)]
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
        return tuple(torch.from_numpy(o) for o in session.run(None, feed))

    run.session = session
    return run


def check_custom(path: Path, prog: RewrittenProgram):
    """The custom form's check: the file loads, onnx.checker passes with the vsopt schemas, and its
    vsopt nodes read back into the plan's entries (tables, orders, quant, blocks)."""
    import onnx

    from vsopt.plugins.onnx import readback, schemas

    from .artifact import Check

    schemas.register()
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    read = readback.plan_from_onnx(model)
    problems = readback.compare(read, prog.plan)
    what = "onnx.checker with the vsopt schemas + plan read back from the file"
    return Check(what, not problems, message="; ".join(problems[:3]) if problems else
                 f"{len(read.sites)} site(s) equal to the plan")
