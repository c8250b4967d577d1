"""Every script in examples/ runs, at a small size, as a user would run it (a fresh process from
another folder). export_and_run.py runs its pt2, onnx (both forms) and trt exports here; its aoti
export is the same call test_export.py makes (an AOTInductor compile costs half a minute)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vsopt.core.plan import Plan

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = pytest.mark.slow


def _run(script: str, *args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_example_has_a_header_saying_how_to_run_it():
    scripts = sorted(p for p in EXAMPLES.glob("*.py"))
    assert {p.name for p in scripts} >= {"compile_wan.py", "calibrate.py", "export_and_run.py", "graph_diff.py"}
    for p in scripts:
        doc = p.read_text().split('"""')[1]
        assert doc.strip() and (p.name == "small_wan.py" or f"python examples/{p.name}" in doc), p.name


def test_compile_wan(tmp_path):
    out = _run("compile_wan.py", "--frames", "2", "--size", "8", cwd=tmp_path)
    assert "attention site(s)" in out and "relative L2 error of the optimized model against eager" in out


def test_calibrate(tmp_path):
    out = _run("calibrate.py", "--inputs", "1", "--out", "ref.plan.json", cwd=tmp_path)
    assert "overall density" in out
    plan = Plan.load(tmp_path / "ref.plan.json")
    # the reference model's 6 self-attention sites are calibrated; its 6 cross-attention sites
    # are written as dense entries (dense on purpose, with the reason in the plan's meta)
    assert len(plan.sites) == 12
    assert sum(1 for sp in plan.sites.values() if not sp.is_dense) >= 1
    assert set(plan.meta["dense_reasons"]) >= {sid for sid in plan.sites if sid.endswith("attn2")}


def test_export_and_run(tmp_path):
    out = _run("export_and_run.py", "--formats", "pt2,onnx,onnx-custom,trt", "--out", "exported", cwd=tmp_path)
    assert out.count("tolerance 1e-04: ok") == 2 and "equal to the plan" in out
    assert "loaded and ran model.pt2" in out and "loaded and ran model.onnx" in out
    assert "TensorRT is not installed" in out and (tmp_path / "exported" / "trt" / "model.onnx").is_file()


def test_graph_diff(tmp_path):
    out = _run("graph_diff.py", "--html", "diff.html", cwd=tmp_path)
    assert "model output" in out and (tmp_path / "diff.html").stat().st_size > 1000
