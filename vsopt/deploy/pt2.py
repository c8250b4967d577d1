"""pt2: the rewritten program as a torch.export ExportedProgram (torch.export.save).

The file holds the vsopt ops (torch.ops.vsopt.*) and the plan's tables as buffers; each vsopt node
carries its site in node.meta["custom"]. Loading needs the ops registered:

    import vsopt.deploy
    run = vsopt.deploy.load("model.pt2")        # or: vsopt.deploy.register_ops(); torch.export.load(...)
    outputs = run(*inputs)                      # a tuple of tensors
"""
from __future__ import annotations

from pathlib import Path

import torch

from vsopt.core.io import atomic_output

from .program import RewrittenProgram
from .progress import Report, step


def write(prog: RewrittenProgram, path: Path, progress: Report | None = None) -> list[Path]:
    with step(progress, "saving the ExportedProgram"), atomic_output(path) as tmp:
        torch.export.save(prog.program, tmp)
    return [path]


def load(path: str | Path):
    """The saved program as a callable (its ExportedProgram's module())."""
    from . import register_ops

    register_ops()
    return torch.export.load(str(path)).module()
