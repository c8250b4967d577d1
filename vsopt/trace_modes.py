"""How `vsopt.inspect` traces a model. A module of its own, without torch, so that both the
inspection and `vsopt inspect --help` (vsopt/inspect_cli.py) can name it."""
from __future__ import annotations

import enum


class Trace(str, enum.Enum):
    """How inspect traces the model: as torch.compile does (Dynamo, graph breaks allowed) or as
    torch.export does (one whole graph)."""

    COMPILE = "compile"
    EXPORT = "export"
