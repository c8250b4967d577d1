"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a part.

Every file vsopt writes (plans and their masks, cost models, reports, checkpoints, images, model
checkpoints) goes through these, with the same permissions (0644 under the usual umask) whoever
writes it. The front's own I/O (MODULE:FACTORY loading) is vsopt/io.py, which re-exports these.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write data to path through a temporary file in the same folder and os.replace; the parent
    folder is created. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")
