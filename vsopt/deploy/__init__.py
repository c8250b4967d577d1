"""vsopt.export(): the optimized model as an artifact that leaves Python.

    result = vsopt.export(model, example_inputs, plan="wan.plan.json", format="onnx", out="wan.onnx")
    print(result.table())

    $ vsopt export mypkg.models:make_wan --plan wan.plan.json --format aoti --out wan.pt2
    $ vsopt export --reference --format onnx --out reference.onnx

Formats (one module each; all start from program.rewritten_program, the passes torch.compile runs):
    pt2    torch.export ExportedProgram (torch.export.save)                      pt2.py
    aoti   AOTInductor package (torch._inductor.aoti_compile_and_package)      aoti.py
    onnx   ONNX, portable (standard ops) or custom ("vsopt" domain) form        onnx.py
    trt    TensorRT: custom-form ONNX + the kernel's PTX for sm_90 + an engine  trt.py

Every artifact is written atomically (temporary file or folder, then os.replace) and, unless
check=False, loaded in a fresh process and compared with the eager optimized model (check.py).
Running an artifact:

    run = vsopt.deploy.load("model.pt2")     # pt2, aoti or a portable .onnx; returns a callable
    outputs = run(*example_inputs)           # a flat tuple of tensors
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["export", "load", "register_ops", "ExportResult", "ExportError", "Check", "SiteOutcome", "FORMATS",
           "ONNX_FORMS"]
_ARTIFACT_NAMES = {"ExportResult", "ExportError", "Check", "SiteOutcome", "FORMATS", "ONNX_FORMS", "SUFFIXES"}


def __getattr__(name: str):
    # The result types load on first use: `vsopt export --help` imports this package, and the
    # types import vsopt.core (torch).
    if name in _ARTIFACT_NAMES:
        from . import artifact

        return getattr(artifact, name)
    raise AttributeError(f"module 'vsopt.deploy' has no attribute {name!r}")


def register_ops() -> None:
    """Register torch.ops.vsopt.* (what loading a pt2 or AOTI artifact needs)."""
    import vsopt.core.dynamic  # noqa: F401  (vsopt::dynamic_block_mask)
    import vsopt.core.ops  # noqa: F401


def _default_out(fmt: str) -> Path:
    from .artifact import SUFFIXES

    return Path("vsopt-export" + (SUFFIXES[fmt] or "-trt"))


def _check_out(fmt: str, out: str | os.PathLike | None) -> Path:
    from vsopt.core.errors import ConfigError

    from .artifact import FORMATS, SUFFIXES

    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    path = Path(out) if out is not None else _default_out(fmt)
    suffix = SUFFIXES[fmt]
    if suffix and path.suffix != suffix:
        raise ConfigError(f"a {fmt} artifact is a {suffix} file; --out {str(path)!r} has another suffix")
    if not suffix and path.exists() and not path.is_dir():
        raise ConfigError(f"the trt format writes a folder; {str(path)!r} is a file")
    if path.is_dir() and suffix:
        raise ConfigError(f"--out {str(path)!r} is a folder; give the {suffix} file to write")
    return path


def export(model: Any, example_inputs: Any, plan: Any = None, format: str = "pt2", out: str | os.PathLike | None = None,
           *, onnx_form: str = "portable", onnx_quant: str = "drop", opset: int | None = None, step: int | None = None,
           check: bool = True, progress=None):
    """Export `model` optimized by `plan` (a Plan, a .plan.json path, or None: every site vsopt's
    exact dense op) as `format` at `out`; returns an ExportResult (.table() is the CLI's table).

    format: "pt2" | "aoti" | "onnx" | "trt". onnx_form: "portable" (standard ops) | "custom"
    ("vsopt" domain nodes). onnx_quant, portable form only: "drop" (default; quantized heads run
    at the model's precision, and the check compares with the eager model of the plan without
    quantization) or "fake" (the kernels' rounding in standard ops: no speed-up, and rounding that
    flips on float differences upstream limits the agreement). opset: ONNX opset (default 23).
    step: the denoising step whose head plans a step-ranged plan exports (None: its default
    heads). check: load the artifact in a fresh process and compare with the eager optimized
    model. progress: a callable taking one line per slow step (the CLI prints them).
    Raises ConfigError / PlanError / ExportError with one line naming the problem; nothing is
    left half-written."""
    from vsopt.core.errors import ConfigError

    from .artifact import ONNX_FORMS, ExportResult
    from .program import resolve_plan, rewritten_program, without_quant

    path = _check_out(format, out)
    if format in ("onnx", "trt"):
        from . import onnx as onnx_format

        opset = onnx_format.DEFAULT_OPSET if opset is None else opset
        if onnx_form not in ONNX_FORMS:
            raise ConfigError(f"onnx_form must be one of {list(ONNX_FORMS)}, got {onnx_form!r}")
        if onnx_quant not in ("drop", "fake"):
            raise ConfigError(f"onnx_quant must be 'drop' or 'fake', got {onnx_quant!r}")
        if not isinstance(opset, int) or opset < onnx_format.MIN_OPSET:
            raise ConfigError(f"opset must be an int >= {onnx_format.MIN_OPSET}, got {opset!r}")
        onnx_format._require("onnx", "onnxscript")
    plan = resolve_plan(plan)
    dropped = format == "onnx" and onnx_form == "portable" and onnx_quant == "drop" and plan is not None
    if dropped:
        plan, quant_note = without_quant(plan)
        dropped = quant_note is not None
    prog = rewritten_program(model, example_inputs, plan, step_index=step, progress=progress)
    notes = list(prog.notes)
    form, tolerance = "", None
    if format == "pt2":
        from . import pt2

        files = pt2.write(prog, path, progress)
    elif format == "aoti":
        from . import aoti

        files = aoti.write(prog, path, progress)
        problem = aoti.load_problem(prog.device)
        if problem:
            notes.append(problem)
    elif format == "onnx":
        form = f"{onnx_form}, opset {opset}"
        files = onnx_format.write(prog, path, onnx_form, opset, progress)
        if dropped:
            notes.append(f"portable ONNX: {quant_note}; the file runs those heads at the model's precision and is "
                         "checked against the eager model of the plan without quantization (onnx_quant='fake' / "
                         "--onnx-quant fake keeps the kernels' rounding, the custom form keeps the modes)")
        elif onnx_form == "portable" and prog.quant_modes - {"none"}:
            tolerance = 1e-2
            notes.append("portable ONNX: quantized heads fake-quantized with standard ops (the reference's rounding, "
                         "no speed-up); a value on a rounding boundary may round the other way after float "
                         f"differences upstream, so the check allows {tolerance:.0e}")
    else:
        from . import trt

        form = f"custom ONNX, opset {opset}, PTX sm_90"
        files = trt.write(prog, path, opset, progress)   # raises ExportError naming what is missing
    result = ExportResult(format, path, files, prog.sites, notes, None, form)
    if check:
        from .progress import step as progress_step

        with progress_step(progress, "checking the artifact in a fresh process"):
            result.check = _check(format, onnx_form, path, prog, tolerance)
    return result


def _check(fmt: str, onnx_form: str, path: Path, prog, tolerance: float | None = None):
    from . import check as check_module
    from .artifact import Check

    if fmt == "onnx" and onnx_form == "custom":
        from . import onnx as onnx_format

        return onnx_format.check_custom(path, prog)
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return Check("onnxruntime", None, message="onnxruntime is not installed: the file was not run")
        providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if prog.device.type == "cuda" \
            else ("CPUExecutionProvider",)
        return check_module.check_in_subprocess("onnx", path, prog, providers=providers, tolerance=tolerance)
    if fmt == "trt":
        return Check("TensorRT engine", None, message="built; vsopt's check does not run TensorRT engines")
    return check_module.check_in_subprocess(fmt, path, prog)


def load(path: str | os.PathLike, format: str | None = None, *, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    """An artifact as a callable returning a tuple of tensors: pt2, aoti (both .pt2: told apart by
    the archive's contents) or a portable-form .onnx (onnxruntime with `providers`)."""
    path = Path(path)
    if format is None:
        format = "onnx" if path.suffix == ".onnx" else _pt2_kind(path)
    if format == "pt2":
        from . import pt2

        return pt2.load(path)
    if format == "aoti":
        from . import aoti

        return aoti.load(path)
    if format == "onnx":
        from . import onnx as onnx_format

        return onnx_format.load(path, providers)
    from vsopt.core.errors import ConfigError

    raise ConfigError(f"cannot load format {format!r} (pt2, aoti or onnx)")


def _pt2_kind(path: Path) -> str:
    """'aoti' when the .pt2 archive holds compiled AOTInductor code, else 'pt2'."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return "aoti" if any("/data/aotinductor/" in n for n in z.namelist()) else "pt2"
    except (zipfile.BadZipFile, FileNotFoundError) as e:
        from .artifact import ExportError

        raise ExportError(f"{str(path)!r} is not a readable .pt2 archive: {e}") from None
