"""What an export produces: the result of vsopt.export() and the closing table the CLI prints.

    ExportResult   format, the files written, per-site outcome, notes, the check run on the artifact
    SiteOutcome    one attention site: optimized (with what) or left dense (with the reason)
    Check          the check run on the artifact (a fresh-process load and compare, or a structural one)
    ExportError    an export that could not be completed (one line, names the step and the cause)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsopt.core.errors import VsoptError

FORMATS = ("pt2", "aoti", "onnx", "trt")
ONNX_FORMS = ("portable", "custom")
#: The file each format writes (trt writes a folder).
SUFFIXES = {"pt2": ".pt2", "aoti": ".pt2", "onnx": ".onnx", "trt": ""}


class ExportError(VsoptError):
    """An export step failed (tracing, conversion, compilation) or needs something not installed;
    the message names the step, the cause and what was (or was not) written."""


@dataclass(frozen=True)
class SiteOutcome:
    site_id: str
    optimized: bool
    detail: str   # what it runs (optimized) or why it stays dense


@dataclass(frozen=True)
class Check:
    """The check run on the written artifact. max_abs / max_rel: against the eager optimized model
    (the rewritten graph run eagerly), over all outputs; None for a structural check."""

    what: str
    ok: bool | None
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: float | None = None
    message: str = ""

    def line(self) -> str:
        if self.max_abs is None:
            verdict = {True: "ok", False: "FAILED", None: "not run"}[self.ok]
            return f"{self.what}: {verdict}" + (f" ({self.message})" if self.message else "")
        verdict = "ok" if self.ok else "MISMATCH"
        return (f"{self.what}: max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e} "
                f"(tolerance {self.tolerance:.0e}: {verdict})" + (f"; {self.message}" if self.message else ""))


@dataclass
class ExportResult:
    format: str
    path: Path
    files: list[Path]
    sites: list[SiteOutcome]
    notes: list[str] = field(default_factory=list)
    check: Check | None = None
    form: str = ""   # e.g. "portable, opset 23"

    @property
    def size(self) -> int:
        """Bytes written (every file of the artifact)."""
        return sum(f.stat().st_size for f in self.files if f.is_file())

    @property
    def optimized(self) -> list[SiteOutcome]:
        return [s for s in self.sites if s.optimized]

    @property
    def dense(self) -> list[SiteOutcome]:
        return [s for s in self.sites if not s.optimized]

    def table(self) -> str:
        fmt = self.format + (f" ({self.form})" if self.form else "")
        rows = [("format", fmt), ("file", str(self.path)), ("size", _size(self.size))]
        if len(self.files) > 1:
            rows.append(("files", f"{len(self.files)}: " + ", ".join(f.name for f in self.files[:6])
                         + (" ..." if len(self.files) > 6 else "")))
        rows.append(("sites", f"{len(self.optimized)} optimized, {len(self.dense)} left dense"))
        rows.append(("check", self.check.line() if self.check else "none"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        if self.sites:
            sw = max(len(s.site_id) for s in self.sites)
            lines.append("")
            for s in self.sites:
                lines.append(f"  {s.site_id.ljust(sw)}  {'optimized' if s.optimized else 'dense    '}  {s.detail}")
        if self.notes:
            lines.append("")
            lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "form": self.form, "path": str(self.path), "size": self.size,
                "files": [str(f) for f in self.files],
                "sites": [{"site_id": s.site_id, "optimized": s.optimized, "detail": s.detail} for s in self.sites],
                "notes": list(self.notes),
                "check": None if self.check is None else {
                    "what": self.check.what, "ok": self.check.ok, "max_abs": self.check.max_abs,
                    "max_rel": self.check.max_rel, "tolerance": self.check.tolerance, "message": self.check.message}}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
