"""The check run on a written artifact: load it in a fresh Python process, run it on the example
inputs, and compare with the eager optimized model (the rewritten graph run eagerly).

A fresh process is what a deployment sees: nothing of the exporting process is reused, only
`import vsopt` for the op registrations. It also contains crashes: a loader that segfaults (AOTI
with CUDA on torch 2.11) is reported as a failed check, not a dead export.

    parent: check_in_subprocess(fmt, artifact, prog) -> Check
    child:  python -m vsopt.deploy.check REQUEST_DIR   (reads request.json and inputs.pt, writes outputs.pt)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .artifact import Check

TIMEOUT_S = 900
_WHAT = {"pt2": "fresh process, torch.export.load", "aoti": "fresh process, aoti_load_package",
         "onnx": "fresh process, onnxruntime"}


def default_tolerance(dtype: torch.dtype) -> float:
    """Max relative error a faithful artifact stays under: float32 rounding over a different
    operation order (fp32), or half-precision rounding."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def compare(got: tuple, want: tuple) -> tuple[float, float]:
    """(max abs error, max relative error = max |got - want| / max |want|, per output) over all outputs."""
    if len(got) != len(want):
        raise ValueError(f"the artifact returned {len(got)} outputs, the eager model {len(want)}")
    worst_abs = worst_rel = 0.0
    for g, w in zip(got, want):
        g, w = g.detach().cpu().double(), w.detach().cpu().double()
        if g.shape != w.shape:
            raise ValueError(f"output shape {tuple(g.shape)}, expected {tuple(w.shape)}")
        d = (g - w).abs().max().item() if w.numel() else 0.0
        worst_abs = max(worst_abs, d)
        worst_rel = max(worst_rel, d / max(w.abs().max().item() if w.numel() else 0.0, 1e-30))
    return worst_abs, worst_rel


def check_in_subprocess(fmt: str, artifact: Path, prog, *, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                        tolerance: float | None = None, timeout: float = TIMEOUT_S) -> Check:
    want = prog.expected()
    what = _WHAT[fmt] + (f" ({', '.join(p.removesuffix('ExecutionProvider') for p in providers)})"
                         if fmt == "onnx" else "")
    tol = tolerance if tolerance is not None else default_tolerance(want[0].dtype if want else torch.float32)
    with tempfile.TemporaryDirectory(prefix="vsopt-check-") as tmp:
        req = Path(tmp)
        torch.save(tuple(prog.inputs), req / "inputs.pt")
        (req / "request.json").write_text(json.dumps({"format": fmt, "artifact": str(Path(artifact).resolve()),
                                                      "providers": list(providers)}))
        env = dict(os.environ)
        try:
            proc = subprocess.run([sys.executable, "-m", "vsopt.deploy.check", str(req)], capture_output=True,
                                  text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return Check(what, False, message=f"the fresh process did not finish in {timeout:.0f} s")
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            return Check(what, False, message=f"the fresh process crashed ({name}) while loading or running the artifact")
        if proc.returncode != 0:
            error = (req / "error.txt").read_text().strip() if (req / "error.txt").exists() else \
                (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return Check(what, False, message=f"the fresh process failed: {error}")
        got = torch.load(req / "outputs.pt")
    try:
        max_abs, max_rel = compare(got, want)
    except ValueError as e:
        return Check(what, False, message=str(e))
    return Check(what, max_rel <= tol, max_abs, max_rel, tol)


def _child(req: Path) -> int:
    request = json.loads((req / "request.json").read_text())
    try:
        from . import load

        run = load(request["artifact"], format=request["format"], providers=tuple(request["providers"]))
        inputs = torch.load(req / "inputs.pt")
        with torch.no_grad():
            outputs = run(*inputs)
        outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
        torch.save(tuple(o.detach().cpu() for o in outputs), req / "outputs.pt")
        return 0
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        (req / "error.txt").write_text(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        return 2


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1])))
