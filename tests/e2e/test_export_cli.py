"""`vsopt export`: --help with defaults; `--reference --format onnx` and `--format aoti` (the shipped
model and plan at the trained clip size) load and match in a fresh process; bad input is one
clear line and leaves nothing behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.resources import files

import pytest
import torch

import vsopt
from vsopt.cli import main
from vsopt.core.errors import ConfigError, PlanError
from vsopt.deploy import ExportError

from . import model_factories

FACTORIES = os.path.join(os.path.dirname(__file__), "model_factories.py")
SHIPPED_PLAN = str(files("vsopt.models") / "assets" / "reference.plan.json")


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir()]


def test_help_lists_every_option_with_its_default():
    out = subprocess.run([sys.executable, "-m", "vsopt.cli", "export", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for text in ("--reference", "--plan", "--format {pt2,aoti,onnx,trt}", "(default: pt2)", "--onnx-form",
                 "(default: portable)", "--onnx-quant", "(default: drop)", "--opset", "(default: 23)", "--step",
                 "--out", "--no-check", "--device", "--dtype", "MODULE:FACTORY"):
        assert text in out, text


@pytest.mark.slow
@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("aoti", ".pt2")])
def test_reference_export_loads_and_matches_in_a_fresh_process(fmt, suffix, tmp_path, capsys):
    out, plan_dir = tmp_path / f"reference{suffix}", tmp_path / "plan"
    plan_dir.mkdir()
    plan_path = _window_plan(plan_dir)   # the shipped 4096-token plan keeps every site dense (docs/MODEL.md)
    assert main(["export", "--reference", "--plan", str(plan_path), "--format", fmt, "--out", str(out),
                 "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "[vsopt export]" in captured.err and "done in" in captured.err          # progress lines
    table = captured.out
    # the plan's self-attention sites are optimized, the cross-attention ones dense with a reason
    assert "6 optimized, 6 left dense" in table and "the plan has no entry for this site" in table
    assert "tolerance 1e-04: ok" in table
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["check"]["ok"] and result["check"]["max_rel"] <= 1e-4 and result["size"] == out.stat().st_size
    assert sorted(_leftovers(tmp_path)) == sorted([out.name, "r.json", "plan"])


def _window_plan(folder):
    """A sparse plan for the reference model at its trained size (a 3-D window on every head of its
    self-attention sites), saved in `folder`: the shipped 4096-token plan keeps every site dense."""
    import dataclasses

    from vsopt.core.patterns import LocalWindow
    from vsopt.core.plan import HeadPlan, Plan, Sparsity

    shipped = Plan.load(SHIPPED_PLAN)
    window = HeadPlan(Sparsity.PATTERN, pattern=LocalWindow(1, 2, 2), block_m=64, block_n=64)
    plan = Plan({sid: dataclasses.replace(sp, heads=(window,) * sp.num_heads, steps=())
                 for sid, sp in shipped.sites.items() if sp.q_len == sp.kv_len})
    path = folder / "window.plan.json"
    plan.save(path)
    return path


def test_a_plan_for_another_model_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "wan.pt2"
    assert main(["export", f"{FACTORIES}:wan", "--plan", SHIPPED_PLAN, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vsopt export: error: the plan does not fit this model:")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("args,message", [
    (["--format", "tflite"], "invalid choice: 'tflite'"),
    (["--out", "x.onnx"], "a pt2 artifact is a .pt2 file"),
    (["--reference"], "give MODULE:FACTORY or --reference"),
    (["--frames", "4"], "--frames and --size apply to --reference only"),
    (["--plan", "shipped"], "--plan shipped is the reference model's plan"),
    (["--format", "onnx", "--onnx-form", "other"], "invalid choice: 'other'"),
    (["--format", "onnx", "--out", "m.onnx", "--opset", "12"], "opset must be an int >= 18"),
])
def test_bad_options_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["export", f"{FACTORIES}:wan", *args])
    except SystemExit as e:   # argparse's own errors
        code = e.code
    assert code in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert _leftovers(tmp_path) == []


def test_unsupported_format_and_missing_dependency_through_the_api(tmp_path, monkeypatch):
    model, inputs = model_factories.wan()
    with pytest.raises(ConfigError, match="format must be one of"):
        vsopt.export(model, inputs, None, "tflite", tmp_path / "m.tflite")
    monkeypatch.setitem(sys.modules, "onnxscript", None)          # as if the extra were not installed
    with pytest.raises(ExportError, match=r"needs onnx and onnxscript \(pip install 'vsopt\[export\]'\)"):
        vsopt.export(model, inputs, None, "onnx", tmp_path / "m.onnx")
    assert _leftovers(tmp_path) == []


def test_missing_onnxruntime_skips_the_run_and_says_so(tmp_path, monkeypatch):
    model, inputs = model_factories.wan()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = vsopt.export(model, inputs, None, "onnx", tmp_path / "m.onnx")
    assert result.path.is_file() and result.check.ok is None and "onnxruntime is not installed" in result.table()


class _DataDependent(torch.nn.Module):
    """Attention after a branch on a value: torch.export cannot trace the branch."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        q, k, v = self.proj(x).view(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_a_model_torch_export_cannot_trace_is_one_error_naming_the_cause(tmp_path):
    with pytest.raises(ExportError, match="torch.export could not trace the model") as e:
        vsopt.export(_DataDependent(), (torch.randn(1, 8, 16),), None, "pt2", tmp_path / "m.pt2")
    assert "\n" not in str(e.value)
    assert _leftovers(tmp_path) == []


def test_a_write_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    model, inputs = model_factories.wan()
    old = tmp_path / "m.pt2"
    old.write_bytes(b"the previous artifact")

    def half_written(program, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        vsopt.export(model, inputs, None, "pt2", old)
    assert old.read_bytes() == b"the previous artifact" and _leftovers(tmp_path) == ["m.pt2"]


def test_a_plan_that_does_not_fit_is_a_plan_error(tmp_path):
    model, inputs = model_factories.wan()
    with pytest.raises(PlanError, match="does not fit this model") as e:
        vsopt.export(model, inputs, SHIPPED_PLAN, "onnx", tmp_path / "m.onnx")
    assert "\n" not in str(e.value)


def test_a_plan_calibrated_at_another_clip_size_is_fitted_and_reported(tmp_path, capsys):
    """`vsopt export --reference` at a clip size other than the shipped plan's: the plan is fitted
    to the model's sites (vsopt.core.resample, as torch.compile's lowering does), every self-attention
    site is optimized, and each fitted site's density change is a note; through the API too."""
    from vsopt.core.plan import Plan

    plan_path = _window_plan(tmp_path)
    sparse = Plan.load(str(plan_path))
    out = tmp_path / "small.pt2"
    assert main(["export", "--reference", "--plan", str(plan_path), "--frames", "2", "--size", "8", "--out", str(out),
                 "--no-check", "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    fitted = [n for n in result["notes"] if n.startswith("plan fitted to the site's size")]
    assert len(fitted) == 6 and all("fitted to grid 2x4x4" in n and "site density" in n for n in fitted)
    assert "6 optimized, 6 left dense" in table and fitted[0] in table
    from vsopt.deploy.reference import reference_target

    model, inputs, _, _ = reference_target(2, 8, None)
    res = vsopt.export(model, inputs, sparse, "pt2", tmp_path / "api.pt2", check=False)
    assert [n for n in res.notes if n.startswith("plan fitted")] == fitted
    assert sum(s.optimized for s in res.sites) == 6
