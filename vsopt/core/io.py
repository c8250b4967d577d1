"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a part.

Every file vsopt writes (plans and their masks, cost models, reports, checkpoints, images, model
checkpoints) goes through these, with the same permissions (0644 under the usual umask) whoever
writes it. The front's own I/O (MODULE:FACTORY loading) is vsopt/io.py, which re-exports these.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


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


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """For files a library writes itself (torch.export.save, an ONNX save, a compiler's package):
    yields a temporary path beside `path` to write; when the block ends without error it is moved
    onto `path` (os.replace: a reader sees the old artifact or the new one), with the usual
    permissions; on error it is removed and `path` is left as it was. Other files the library puts
    beside the temporary path (e.g. an ONNX model's external-data file) are moved beside `path`
    first. folder=True: the temporary path is an empty folder, moved into place as a whole (an
    existing folder at `path` is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    target = staging if folder else staging / path.name
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"nothing was written to {target}")
        for p in [staging, *staging.rglob("*")]:   # mkdtemp / mkstemp modes -> the usual ones
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())
        if folder and path.is_dir():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)   # the old folder steps aside, the new one takes its name
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        elif folder:
            os.replace(target, path)
        else:
            for side in staging.iterdir():   # sidecar files first, the main file last
                if side != target:
                    os.replace(side, path.parent / side.name)
            os.replace(target, path)
    finally:
        if staging.exists():   # an error, or the file's staging folder after its move
            shutil.rmtree(staging, ignore_errors=True)
