"""Loading an exported artifact back: register vsopt's ops, then open a pt2, AOTI or portable ONNX
file as a callable returning a tuple of tensors."""
from __future__ import annotations

import os
from pathlib import Path


def register_ops() -> None:
    """Register torch.ops.vsopt.* (what loading a pt2 or AOTI artifact needs)."""
    import vsopt.core.dynamic  # noqa: F401  (vsopt::dynamic_block_mask)
    import vsopt.core.ops  # noqa: F401


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
