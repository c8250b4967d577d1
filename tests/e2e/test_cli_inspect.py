"""`vsopt inspect MODULE:FACTORY`: the table, --json (written atomically), --grid, --strict, and
clear errors for bad input."""
from __future__ import annotations

import json
import os

import pytest

from vsopt.cli import main

FACTORIES = os.path.join(os.path.dirname(__file__), "model_factories.py")


def test_inspect_table_and_json(tmp_path, capsys):
    out_json = tmp_path / "sites.json"
    assert main(["inspect", f"{FACTORIES}:videomae", "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "encoder.layer.0.attention.attention" in table and "2x4x4 (inferred)" in table
    assert "2 attention site(s)" in table
    data = json.loads(out_json.read_text())
    assert [s["site_id"] for s in data["sites"]] == ["encoder.layer.0.attention.attention",
                                                    "encoder.layer.1.attention.attention"]
    assert data["sites"][0]["grid"] == {"frames": 2, "height": 4, "width": 4, "text_before": 0, "text_after": 0}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".vsopt-")]  # no temp file left


@pytest.mark.parametrize("args,message", [
    (["nope_module_xyz:make"], "cannot import 'nope_module_xyz'"),
    (["just_a_name"], "expected MODULE:FACTORY"),
    ([f"{FACTORIES}:no_such_factory"], "has no callable 'no_such_factory'"),
    (["missing_file.py:make"], "no file 'missing_file.py'"),
    ([f"{FACTORIES}:videomae", "--grid", "2,4"], "expected 3 to 5 integers"),
    ([f"{FACTORIES}:videomae", "--grid", "a,b,c"], "expected integers"),
])
def test_inspect_bad_input(args, message, capsys):
    assert main(["inspect", *args]) == 1
    assert message in capsys.readouterr().err


def test_inspect_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0
    assert "MODULE:FACTORY" in capsys.readouterr().out


def test_negative_grid_is_checked_not_misparsed(capsys):
    """`--grid -4,4,4` reaches the grid check (issue 12 item 8) instead of argparse's
    "expected one argument"."""
    assert main(["inspect", f"{FACTORIES}:videomae", "--grid", "-4,4,4"]) == 1
    err = capsys.readouterr().err
    assert "expected one argument" not in err and "grid" in err and len(err.strip().splitlines()) == 1


def test_json_into_a_missing_folder_is_created(tmp_path, capsys):
    out_json = tmp_path / "new" / "folder" / "sites.json"
    assert main(["inspect", f"{FACTORIES}:videomae", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["sites"]


def test_module_in_the_current_folder_is_found(tmp_path, monkeypatch, capsys):
    """`vsopt inspect mymod:make` finds ./mymod.py from the console script too."""
    (tmp_path / "vsopt_cwd_target.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, q, k, v):\n"
        "        return torch.nn.functional.scaled_dot_product_attention(q, k, v)\n"
        "def make():\n"
        "    x = torch.randn(1, 2, 16, 8)\n"
        "    return M(), (x, x, x)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert main(["inspect", "vsopt_cwd_target:make"]) == 0
    assert "1 attention site(s)" in capsys.readouterr().out


def test_factory_failure_names_the_step(tmp_path, capsys):
    (tmp_path / "failing.py").write_text("def make():\n    raise RuntimeError('weights missing')\n")
    assert main(["inspect", f"{tmp_path / 'failing.py'}:make"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "calling the factory failed: RuntimeError: weights missing" in err


# ----------------------------------------------------------------------------- how inspect traces (issue 14 class 2)

import torch  # noqa: E402

import vsopt  # noqa: E402
from vsopt.core.errors import UnsupportedSiteError, VsoptError  # noqa: E402

from . import model_factories  # noqa: E402


def test_a_data_dependent_branch_gets_a_report_as_compile_traces_it():
    """torch.export stops on `if torch.all(image == 0)`; inspect traces as torch.compile does (a graph
    break) and reports both sites with their grid, and says the graph broke."""
    model, inputs = model_factories.branchy()
    report = vsopt.inspect(model, *inputs)
    assert [(s.site_id, str(s.grid)) for s in report.sites] == [("blocks.0.attn", "2x4x4"), ("blocks.1.attn", "2x4x4")]
    assert report.trace is vsopt.inspection.Trace.COMPILE and report.graphs >= 2 and report.skipped == []
    assert any(n.startswith("graph break") for n in report.notes), report.notes
    with pytest.raises(VsoptError, match=r"torch.export could not trace the model .*trace='compile'"):
        vsopt.inspect(model, *inputs, trace="export")
    with pytest.raises(ValueError, match="trace must be one of"):
        vsopt.inspect(model, *inputs, trace="jit")


def test_the_export_trace_is_there_when_asked_for(capsys):
    assert main(["inspect", f"{FACTORIES}:videomae", "--trace", "export"]) == 0
    out = capsys.readouterr().out
    assert "2 attention site(s) in 1 graph(s), traced as torch.export does" in out and "2x4x4 (inferred)" in out
    assert main(["inspect", f"{FACTORIES}:branchy", "--trace", "export"]) == 1
    assert "torch.export could not trace the model" in capsys.readouterr().err


def test_hunyuan_video15_image_to_video_gets_a_report(capsys):
    """The issue's example: no report at all under torch.export. Traced as torch.compile does, its two
    sites are found, with their full module paths (the block's graph is a frame of its own, placed in
    the model: passes/site_ids.py), and the report says where compile's view is partial (frames run
    eagerly)."""
    assert main(["inspect", f"{FACTORIES}:hunyuan_video15"]) == 0
    out = capsys.readouterr().out
    assert "2 attention site(s) in 3 graph(s)" in out
    assert "context_embedder.token_refiner.refiner_blocks.0.attn" in out
    assert "\ntransformer_blocks.0.attn " in out and "is not a module path" not in out
    assert "frame(s) ran eagerly" in out


def test_strict_errors_come_out_of_torch_compile_unwrapped():
    """A plan that does not fit, under strict mode: the passes' UnsupportedSiteError, not Dynamo's
    BackendCompilerFailed around it."""

    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    from vsopt.core.plan import HeadPlan, Plan, SitePlan

    q = torch.randn(1, 2, 32, 8)
    bad = Plan({"attention.0": SitePlan("attention.0", 4, 32, 32, None, (HeadPlan(),) * 4)})
    with pytest.raises(UnsupportedSiteError, match="the plan has 4 heads, the site 2"):
        vsopt.inspect(Sdpa(), q, q, q, options={"plan": bad, "strict": True})
